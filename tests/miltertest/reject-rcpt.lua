-- The bare gateway address and a token of bad syntax are refused at RCPT;
-- a valid token and other recipients pass.
dofile(os.getenv("SCRIPT_DIR") .. "/common.lua")

conn = open()
if mt.mailfrom(conn, "<bob@example.com>") ~= nil then error("mt.mailfrom() failed") end
expect(mt.getreply(conn), SMFIR_CONTINUE, "mailfrom")
for _, r in ipairs({"<calendar@example.org>", "<calendar+bad!token@example.org>"}) do
	if mt.rcptto(conn, r) ~= nil then error("mt.rcptto() failed") end
	expect(mt.getreply(conn), SMFIR_REPLYCODE, "rcptto " .. r)
end
if mt.rcptto(conn, "<alice@example.org>") ~= nil then error("mt.rcptto() failed") end
expect(mt.getreply(conn), SMFIR_CONTINUE, "rcptto alice")
-- Only ordinary recipients left: accepted at DATA, no further callbacks.
if mt.data(conn) ~= nil then error("mt.data() failed") end
expect(mt.getreply(conn), SMFIR_ACCEPT, "data")
mt.disconnect(conn)

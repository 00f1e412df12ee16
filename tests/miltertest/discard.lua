-- A reply to the gateway address alone is spooled, then discarded.
dofile(os.getenv("SCRIPT_DIR") .. "/common.lua")

conn = open()
if mt.mailfrom(conn, "<bob@example.com>") ~= nil then error("mt.mailfrom() failed") end
expect(mt.getreply(conn), SMFIR_CONTINUE, "mailfrom")
-- Postfix sets the queue id macro i once the first recipient is accepted.
mt.macro(conn, SMFIC_RCPT, "i", "9MTEST0001")
if mt.rcptto(conn, "<calendar+" .. token .. "@example.org>") ~= nil then error("mt.rcptto() failed") end
expect(mt.getreply(conn), SMFIR_CONTINUE, "rcptto")
send_reply(conn, "mt-discard-0001")
expect(mt.getreply(conn), SMFIR_DISCARD, "eom")
mt.disconnect(conn)

-- Mixed recipients: the gateway recipient is deleted with the RCPT argument
-- exactly as received; the message goes on to the others.
dofile(os.getenv("SCRIPT_DIR") .. "/common.lua")

conn = open()
if mt.mailfrom(conn, "<bob@example.com>") ~= nil then error("mt.mailfrom() failed") end
expect(mt.getreply(conn), SMFIR_CONTINUE, "mailfrom")
if mt.rcptto(conn, "<grace@example.org>") ~= nil then error("mt.rcptto() failed") end
expect(mt.getreply(conn), SMFIR_CONTINUE, "rcptto grace")
mt.macro(conn, SMFIC_RCPT, "i", "9MTEST0002")
raw = "<Calendar+" .. token .. "@Example.ORG>"
if mt.rcptto(conn, raw) ~= nil then error("mt.rcptto() failed") end
expect(mt.getreply(conn), SMFIR_CONTINUE, "rcptto gateway")
send_reply(conn, "mt-mixed-0002")
reply = mt.getreply(conn)
if reply ~= SMFIR_ACCEPT and reply ~= SMFIR_CONTINUE then
	error("eom: unexpected reply " .. tostring(reply))
end
if not mt.eom_check(conn, MT_RCPTDELETE, raw) then
	error("gateway recipient not deleted as " .. raw)
end
if mt.eom_check(conn, MT_RCPTDELETE, "<grace@example.org>") then
	error("grace was deleted too")
end
mt.disconnect(conn)

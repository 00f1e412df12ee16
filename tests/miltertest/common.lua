-- Shared by the miltertest scripts: connection and a calendar reply.
-- MILTER_PORT and TOKEN come from the environment (tests/miltertest.rs).

port = os.getenv("MILTER_PORT") or error("MILTER_PORT not set")
token = os.getenv("TOKEN") or error("TOKEN not set")

function expect(got, want, what)
	if got ~= want then
		error(what .. ": unexpected reply " .. tostring(got) .. ", want " .. tostring(want))
	end
end

function open()
	local conn = mt.connect("inet:" .. port .. "@127.0.0.1", 20, 0.25)
	if conn == nil then error("mt.connect() failed") end
	if mt.conninfo(conn, "client.example.com", "192.0.2.25") ~= nil then
		error("mt.conninfo() failed")
	end
	expect(mt.getreply(conn), SMFIR_CONTINUE, "conninfo")
	return conn
end

function send_reply(conn, uid)
	local headers = {
		{"From", "Bob Example <bob@example.com>"},
		{"To", "calendar+" .. token .. "@example.org"},
		{"Subject", "Accepted: Review"},
		{"Message-ID", "<" .. uid .. "@example.com>"},
		{"MIME-Version", "1.0"},
		{"Content-Type", "text/calendar; charset=utf-8; method=REPLY"},
	}
	for _, h in ipairs(headers) do
		if mt.header(conn, h[1], h[2]) ~= nil then error("mt.header() failed") end
		expect(mt.getreply(conn), SMFIR_CONTINUE, "header " .. h[1])
	end
	if mt.eoh(conn) ~= nil then error("mt.eoh() failed") end
	expect(mt.getreply(conn), SMFIR_CONTINUE, "eoh")
	local body = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//miltertest//EN\r\nMETHOD:REPLY\r\n" ..
		"BEGIN:VEVENT\r\nUID:" .. uid .. "\r\nDTSTAMP:20261120T100000Z\r\n" ..
		"ATTENDEE;PARTSTAT=ACCEPTED;CN=\"Example, Bob\":mailto:bob@example.com\r\n" ..
		"END:VEVENT\r\nEND:VCALENDAR\r\n"
	if mt.bodystring(conn, body) ~= nil then error("mt.bodystring() failed") end
	expect(mt.getreply(conn), SMFIR_CONTINUE, "body")
	if mt.eom(conn) ~= nil then error("mt.eom() failed") end
end

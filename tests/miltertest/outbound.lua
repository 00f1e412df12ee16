-- Outbound tokenization: an invitation gets a token only when the sender
-- authenticated as its organizer; non-ASCII headers and calendar text, in
-- UTF-8 and in Latin-1, are tokenized without harm.
dofile(os.getenv("SCRIPT_DIR") .. "/common.lua")

function invite(login, uid, from, summary, charset)
	local conn = open()
	if login ~= nil then
		-- Postfix sends the SASL login with MAIL FROM.
		if mt.macro(conn, SMFIC_MAIL, "{auth_authen}", login) ~= nil then error("mt.macro() failed") end
	end
	if mt.mailfrom(conn, "<alice@example.org>") ~= nil then error("mt.mailfrom() failed") end
	expect(mt.getreply(conn), SMFIR_CONTINUE, "mailfrom")
	mt.macro(conn, SMFIC_RCPT, "i", "9MTOUT" .. uid)
	if mt.rcptto(conn, "<bob@example.com>") ~= nil then error("mt.rcptto() failed") end
	expect(mt.getreply(conn), SMFIR_CONTINUE, "rcptto")
	if mt.data(conn) ~= nil then error("mt.data() failed") end
	expect(mt.getreply(conn), SMFIR_CONTINUE, "data")
	local headers = {
		{"From", from},
		{"To", "bob@example.com"},
		{"Subject", "Invitation"},
		{"Message-ID", "<" .. uid .. "@example.org>"},
		{"MIME-Version", "1.0"},
		{"Content-Type", "text/calendar; charset=" .. charset .. "; method=REQUEST"},
		{"Content-Transfer-Encoding", "8bit"},
	}
	for _, h in ipairs(headers) do
		if mt.header(conn, h[1], h[2]) ~= nil then error("mt.header() failed") end
		expect(mt.getreply(conn), SMFIR_CONTINUE, "header " .. h[1])
	end
	if mt.eoh(conn) ~= nil then error("mt.eoh() failed") end
	expect(mt.getreply(conn), SMFIR_CONTINUE, "eoh")
	local body = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//miltertest//EN\r\nMETHOD:REQUEST\r\n" ..
		"BEGIN:VEVENT\r\nUID:" .. uid .. "\r\nDTSTAMP:20261120T100000Z\r\nDTSTART:20261210T100000Z\r\n" ..
		"SUMMARY:" .. summary .. "\r\n" ..
		"ORGANIZER;CN=" .. summary .. ":mailto:alice@example.org\r\n" ..
		"ATTENDEE;PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:bob@example.com\r\n" ..
		"END:VEVENT\r\nEND:VCALENDAR\r\n"
	if mt.bodystring(conn, body) ~= nil then error("mt.bodystring() failed") end
	expect(mt.getreply(conn), SMFIR_CONTINUE, "body")
	if mt.eom(conn) ~= nil then error("mt.eom() failed") end
	expect(mt.getreply(conn), SMFIR_ACCEPT, "eom " .. uid)
	local tokenized = mt.eom_check(conn, MT_HDRADD, "Reply-To") and mt.eom_check(conn, MT_BODYCHANGE)
	mt.disconnect(conn)
	return tokenized
end

-- The envelope sender alone is no authentication.
if invite(nil, "out-nosasl", "Alice <alice@example.org>", "Review", "utf-8") then
	error("tokenized without SMTP AUTH")
end
-- Another login may not send for Alice.
if invite("mallory", "out-mallory", "Alice <alice@example.org>", "Review", "utf-8") then
	error("tokenized for another login")
end
if not invite("alice@example.org", "out-sasl", "Alice <alice@example.org>", "Review", "utf-8") then
	error("not tokenized with Alice's login")
end
-- UTF-8 and Latin-1 (raw 8-bit) in From and SUMMARY: "Zoë", "Über".
if not invite("alice@example.org", "out-utf8", "Zo\195\171 <alice@example.org>", "\195\156ber", "utf-8") then
	error("UTF-8 invitation not tokenized")
end
if not invite("alice@example.org", "out-latin1", "Zo\235 <alice@example.org>", "\220ber", "iso-8859-1") then
	error("Latin-1 invitation not tokenized")
end

-- Wireshark dissector for the chatpipe chat protocol, v0.5 and v0.6,
-- written from docs/PROTOCOL.md.
--
--   wireshark -X lua_script:tools/chatpipe.lua
--   tshark -X lua_script:tools/chatpipe.lua -r capture.pcap -Y chatpipe
--
-- or copy this file to ~/.local/lib/wireshark/plugins/.
--
-- Frames are a u32 big-endian payload length, then the payload; a payload
-- starts with its u32 big-endian type. The dissector is registered on TCP
-- port 33333 (preference `chatpipe.tcp_port`), can be chosen with Decode As
-- (`-d tcp.port==PORT,chatpipe`), and has a heuristic (`chatpipe_tcp`) that
-- claims a TCP conversation on other ports when a segment starts with a
-- whole, well-formed chatpipe frame. Frames split across segments and
-- several frames in one segment are reassembled. Unknown types are shown as
-- "Unknown (N)" and skipped, as peers skip them; malformed payloads are
-- flagged with expert info.

local chatpipe = Proto("chatpipe", "chatpipe chat protocol")

local DEFAULT_PORT = 33333
-- chat::MAX_PAYLOAD_LEN: a v0.6 Direct with the longest nickname and text.
local MAX_PAYLOAD_LEN = 65813

local type_names = {
    [0] = "Chat",
    [1] = "Broadcast",
    [2] = "Keepalive",
    [3] = "Set nickname",
    [4] = "Ack",
    [5] = "Nak",
    [16] = "Hello",
    [17] = "Welcome",
    [18] = "Notice",
    [19] = "Say",
    [20] = "Direct",
    [21] = "Private",
    [22] = "Who",
    [23] = "Members",
    [24] = "Presence",
    [25] = "History",
    [26] = "Login",
}

local change_names = { [0] = "joined", [1] = "left", [2] = "renamed" }

local f = chatpipe.fields
f.len = ProtoField.uint32("chatpipe.len", "Length", base.DEC, nil, nil,
    "Payload length, not counting these 4 bytes")
f.type = ProtoField.uint32("chatpipe.type", "Type", base.DEC, type_names)
f.string_len = ProtoField.uint16("chatpipe.string_len", "String length", base.DEC)
f.text = ProtoField.string("chatpipe.text", "Text", base.UNICODE)
f.from = ProtoField.string("chatpipe.from", "From", base.UNICODE)
f.to = ProtoField.string("chatpipe.to", "To", base.UNICODE)
f.nickname = ProtoField.string("chatpipe.nickname", "Nickname", base.UNICODE)
f.new_nickname = ProtoField.string("chatpipe.new_nickname", "New nickname", base.UNICODE)
f.message = ProtoField.string("chatpipe.message", "Message", base.UNICODE,
    "A Nak's reason")
f.request_id = ProtoField.bytes("chatpipe.request_id", "Request ID", base.NONE,
    "16 opaque bytes pairing a request with its response")
f.versions_count = ProtoField.uint8("chatpipe.versions.count", "Versions", base.DEC)
f.versions = ProtoField.uint16("chatpipe.versions", "Version offered", base.HEX,
    nil, nil, "major << 8 | minor")
f.version = ProtoField.uint16("chatpipe.version", "Version chosen", base.HEX,
    nil, nil, "major << 8 | minor")
f.capabilities_count = ProtoField.uint8("chatpipe.capabilities.count", "Capabilities", base.DEC)
f.capability = ProtoField.string("chatpipe.capability", "Capability", base.UNICODE)
f.credentials = ProtoField.string("chatpipe.credentials", "Credentials", base.UNICODE)
f.max_frame = ProtoField.uint32("chatpipe.max_frame", "Max frame", base.DEC, nil, nil,
    "Largest payload the server accepts, in bytes")
f.rate = ProtoField.uint32("chatpipe.rate", "Rate", base.DEC, nil, nil,
    "Messages per 1,000 s; 0 for no limit")
f.burst = ProtoField.uint32("chatpipe.burst", "Burst", base.DEC)
f.keepalive_ms = ProtoField.uint32("chatpipe.keepalive_ms", "Keepalive interval (ms)", base.DEC)
f.total = ProtoField.uint32("chatpipe.total", "Total members", base.DEC)
f.names_count = ProtoField.uint16("chatpipe.names.count", "Names", base.DEC)
f.name = ProtoField.string("chatpipe.name", "Name", base.UNICODE)
f.change = ProtoField.uint8("chatpipe.change", "Change", base.DEC, change_names)
f.at_ms = ProtoField.uint64("chatpipe.at_ms", "At (ms since the Unix epoch)", base.DEC)
f.trailing = ProtoField.bytes("chatpipe.trailing", "Trailing bytes (ignored)")
f.data = ProtoField.bytes("chatpipe.data", "Undecoded payload")

local ef = chatpipe.experts
ef.truncated = ProtoExpert.new("chatpipe.truncated", "Field runs past the end of the message",
    expert.group.MALFORMED, expert.severity.ERROR)
ef.invalid_utf8 = ProtoExpert.new("chatpipe.invalid_utf8", "String is not valid UTF-8",
    expert.group.MALFORMED, expert.severity.ERROR)
ef.too_large = ProtoExpert.new("chatpipe.too_large", "Frame longer than the maximum payload",
    expert.group.MALFORMED, expert.severity.ERROR)
ef.unknown_type = ProtoExpert.new("chatpipe.unknown_type", "Unknown message type, skipped",
    expert.group.UNDECODED, expert.severity.NOTE)
ef.unknown_change = ProtoExpert.new("chatpipe.unknown_change",
    "Unknown presence change, message skipped", expert.group.UNDECODED, expert.severity.NOTE)
ef.trailing = ProtoExpert.new("chatpipe.trailing_bytes",
    "Bytes after the last field, ignored", expert.group.PROTOCOL, expert.severity.NOTE)

chatpipe.prefs.tcp_port = Pref.uint("TCP port", DEFAULT_PORT,
    "TCP port of the chat protocol (other ports: Decode As, or the heuristic)")
chatpipe.prefs.max_frame = Pref.uint("Maximum payload length", MAX_PAYLOAD_LEN,
    "A frame announcing a longer payload is flagged and not reassembled")
chatpipe.prefs.heuristic = Pref.bool("Detect on any TCP port", true,
    "Claim a TCP conversation whose segment starts with a whole, well-formed frame")

------------------------------------------------------------------------
-- Decoding: a payload becomes a list of items (field, range, value) and a
-- summary, without touching the tree, so the heuristic can use it too.
------------------------------------------------------------------------

-- Whether a Lua string is valid UTF-8 (as Rust's str::from_utf8 sees it:
-- no overlong forms, no surrogates, nothing past U+10FFFF).
local function valid_utf8(s)
    if not s:find("[\128-\255]") then
        return true
    end
    local i, n = 1, #s
    while i <= n do
        local c = s:byte(i)
        if c < 0x80 then
            i = i + 1
        else
            local more, min, cp
            if c >= 0xC2 and c <= 0xDF then
                more, min, cp = 1, 0x80, c - 0xC0
            elseif c >= 0xE0 and c <= 0xEF then
                more, min, cp = 2, 0x800, c - 0xE0
            elseif c >= 0xF0 and c <= 0xF4 then
                more, min, cp = 3, 0x10000, c - 0xF0
            else
                return false
            end
            if i + more > n then
                return false
            end
            for j = 1, more do
                local cc = s:byte(i + j)
                if cc < 0x80 or cc > 0xBF then
                    return false
                end
                cp = cp * 64 + (cc - 0x80)
            end
            if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then
                return false
            end
            i = i + more + 1
        end
    end
    return true
end

-- At most `max` bytes of a string for the Info column, not cut inside a
-- UTF-8 sequence.
local function clip(s, max)
    max = max or 40
    if #s <= max then
        return s
    end
    local cut = max
    while cut > 0 and s:byte(cut + 1) >= 0x80 and s:byte(cut + 1) <= 0xBF do
        cut = cut - 1
    end
    return s:sub(1, cut) .. "…"
end

local function quoted(s)
    return '"' .. clip(s) .. '"'
end

local function version_string(v)
    return string.format("%d.%d", math.floor(v / 256), v % 256)
end

-- A reader over one payload. Each read appends an item and returns its
-- value, or nil (with `r.err` set) once a field does not fit or is invalid;
-- after that every read returns nil.
local Reader = {}
Reader.__index = Reader

local function new_reader(tvb)
    return setmetatable({ tvb = tvb, off = 0, items = {}, err = nil }, Reader)
end

function Reader:left()
    return self.tvb:len() - self.off
end

-- Flags the field `name` as running past the end (from `start` on).
function Reader:truncated(name, start)
    local len = self.tvb:len() - start
    self.err = {
        expert = ef.truncated,
        range = len > 0 and self.tvb(start, len) or nil,
        text = "`" .. name .. "` runs past the end of the message",
    }
    return nil
end

-- An item: `parent` is the index of the item it goes under, if any.
function Reader:push(item)
    self.items[#self.items + 1] = item
    return #self.items
end

function Reader:uint(field, name, size, parent)
    if self.err then return nil end
    if self:left() < size then
        return self:truncated(name, self.off)
    end
    local range = self.tvb(self.off, size)
    local value = size == 8 and range:uint64() or range:uint()
    self.off = self.off + size
    self:push({ field = field, range = range, parent = parent })
    return value
end

function Reader:request_id()
    if self.err then return nil end
    if self:left() < 16 then
        return self:truncated("request_id", self.off)
    end
    local range = self.tvb(self.off, 16)
    self.off = self.off + 16
    self:push({ field = f.request_id, range = range })
    return tostring(range:bytes()):lower()
end

-- A string: a length of `width` bytes (1: short, 2: long), then UTF-8.
-- Credentials (docs/PROTOCOL.md, "Accounts"): `scheme NUL nickname NUL
-- password`. Shown as the scheme and the nickname, never the password;
-- returns that, or nil if the string is truncated or not UTF-8.
function Reader:credentials()
    local value = self:string(f.credentials, "credentials", 2)
    if not value then return nil end
    local item = self.items[#self.items - 1]
    local raw = item.range:raw(2)
    local scheme, nick = raw:match("^([^\0]*)\0([^\0]*)\0")
    local shown = scheme and (scheme .. " " .. nick) or (raw == "" and "" or "malformed")
    item.value = shown
    return shown
end

function Reader:string(field, name, width, parent)
    if self.err then return nil end
    local start = self.off
    if self:left() < width then
        return self:truncated(name, start)
    end
    local n = self.tvb(start, width):uint()
    if self:left() < width + n then
        return self:truncated(name, start)
    end
    local raw = n > 0 and self.tvb(start + width, n):raw() or ""
    local value = n > 0 and self.tvb(start + width, n):string(ENC_UTF_8) or ""
    self.off = start + width + n
    local index = self:push({ field = field, range = self.tvb(start, width + n),
        value = value, parent = parent })
    self:push({ field = f.string_len, range = self.tvb(start, width), parent = index })
    if not valid_utf8(raw) then
        self.err = {
            expert = ef.invalid_utf8,
            range = self.tvb(start, width + n),
            text = "`" .. name .. "` is not valid UTF-8",
        }
        return nil
    end
    return value
end

-- A count of `width` bytes, then that many items read by `each(parent)`.
-- A count the rest of the payload cannot hold (each item takes at least
-- `min` bytes) is truncated before anything is read.
function Reader:list(count_field, name, width, min, each)
    local start = self.off
    local n = self:uint(count_field, name, width)
    if not n then return nil end
    if n * min > self:left() then
        return self:truncated(name, start)
    end
    local parent = #self.items
    local values = {}
    for _ = 1, n do
        local v = each(parent)
        if v == nil then return nil end
        values[#values + 1] = v
    end
    return values
end

-- Decoders by type: each reads its fields and returns the Info summary.
local decoders = {}

decoders[0] = function(r) -- Chat
    local text = r:string(f.text, "text", 2)
    return text and quoted(text)
end

decoders[1] = function(r) -- Broadcast
    local from = r:string(f.from, "from", 1)
    local text = r:string(f.text, "text", 2)
    return text and (clip(from) .. ": " .. quoted(text))
end

decoders[2] = function(r) -- Keepalive
    return ""
end

decoders[3] = function(r) -- Set nickname
    r:request_id()
    local nickname = r:string(f.nickname, "nickname", 1)
    return nickname and quoted(nickname)
end

decoders[4] = function(r) -- Ack
    local id = r:request_id()
    return id and ("id " .. id:sub(1, 8) .. "…")
end

decoders[5] = function(r) -- Nak
    r:request_id()
    local message = r:string(f.message, "message", 2)
    return message and quoted(message)
end

decoders[16] = function(r) -- Hello
    r:request_id()
    local versions = r:list(f.versions_count, "versions", 1, 2, function(parent)
        local v = r:uint(f.versions, "versions", 2, parent)
        return v and version_string(v)
    end)
    local caps = r:list(f.capabilities_count, "capabilities", 1, 1, function(parent)
        return r:string(f.capability, "capabilities", 1, parent)
    end)
    local credentials = r:credentials()
    return credentials and ("versions " .. clip(table.concat(versions, ", "))
        .. " [" .. clip(table.concat(caps, ", "), 80) .. "]")
end

decoders[17] = function(r) -- Welcome
    r:request_id()
    local version = r:uint(f.version, "version", 2)
    local caps = r:list(f.capabilities_count, "capabilities", 1, 1, function(parent)
        return r:string(f.capability, "capabilities", 1, parent)
    end)
    local max_frame = r:uint(f.max_frame, "max_frame", 4)
    r:uint(f.rate, "rate", 4)
    r:uint(f.burst, "burst", 4)
    local keepalive = r:uint(f.keepalive_ms, "keepalive_ms", 4)
    return keepalive and (version_string(version) .. " [" .. clip(table.concat(caps, ", "), 80)
        .. "] max_frame " .. max_frame)
end

decoders[18] = function(r) -- Notice
    local text = r:string(f.text, "text", 2)
    return text and quoted(text)
end

decoders[19] = function(r) -- Say
    r:request_id()
    local text = r:string(f.text, "text", 2)
    return text and quoted(text)
end

decoders[20] = function(r) -- Direct
    r:request_id()
    local to = r:string(f.to, "to", 1)
    local text = r:string(f.text, "text", 2)
    return text and ("to " .. clip(to) .. ": " .. quoted(text))
end

decoders[21] = function(r) -- Private
    local from = r:string(f.from, "from", 1)
    local text = r:string(f.text, "text", 2)
    return text and ("from " .. clip(from) .. ": " .. quoted(text))
end

decoders[22] = function(r) -- Who
    r:request_id()
    return ""
end

decoders[23] = function(r) -- Members
    r:request_id()
    local total = r:uint(f.total, "total", 4)
    local names = r:list(f.names_count, "names", 2, 1, function(parent)
        return r:string(f.name, "names", 1, parent)
    end)
    return names and (total .. ": " .. clip(table.concat(names, ", ")))
end

decoders[24] = function(r) -- Presence
    local change = r:uint(f.change, "change", 1)
    if change and not change_names[change] then
        -- A change this version does not know: peers skip the message.
        r.note = { expert = ef.unknown_change,
            text = "Unknown presence change " .. change .. ", message skipped" }
        return "unknown change " .. change
    end
    local nickname = r:string(f.nickname, "nickname", 1)
    local new_nickname = r:string(f.new_nickname, "new_nickname", 1)
    if not new_nickname then return nil end
    if change == 2 then
        return clip(nickname) .. " renamed to " .. clip(new_nickname)
    end
    return clip(nickname) .. " " .. change_names[change]
end

decoders[25] = function(r) -- History
    r:uint(f.at_ms, "at_ms", 8)
    local from = r:string(f.from, "from", 1)
    local text = r:string(f.text, "text", 2)
    return text and (clip(from) .. ": " .. quoted(text))
end

decoders[26] = function(r) -- Login
    r:request_id()
    local credentials = r:credentials()
    return credentials and (credentials == "" and "guest" or credentials)
end

-- Decodes one payload: { type, name, items, summary, err, note, known }.
local function decode_payload(tvb)
    local r = new_reader(tvb)
    local msg_type = r:uint(f.type, "type", 4)
    if not msg_type then
        return { name = "Malformed", items = r.items, err = r.err, summary = "" }
    end
    local decoder = decoders[msg_type]
    if not decoder then
        if r:left() > 0 then
            r:push({ field = f.data, range = tvb(r.off, r:left()) })
        end
        return {
            type = msg_type,
            name = string.format("Unknown (%d)", msg_type),
            items = r.items,
            summary = "",
            note = { expert = ef.unknown_type,
                text = "Unknown message type " .. msg_type .. ", skipped" },
        }
    end
    local summary = decoder(r)
    if not r.err and not r.note and r:left() > 0 then
        local range = tvb(r.off, r:left())
        r:push({ field = f.trailing, range = range })
        r.note = { expert = ef.trailing, range = range,
            text = r:left() .. " bytes after the last field, ignored" }
    end
    if r.note and not r.err and r.note.expert == ef.unknown_change and r:left() > 0 then
        r:push({ field = f.data, range = tvb(r.off, r:left()) })
    end
    return {
        type = msg_type,
        name = type_names[msg_type],
        items = r.items,
        summary = summary or "",
        err = r.err,
        note = r.note,
        known = true,
    }
end

------------------------------------------------------------------------
-- Display
------------------------------------------------------------------------

local function add_items(tree, items)
    local nodes = {}
    for i, item in ipairs(items) do
        local parent = item.parent and nodes[item.parent] or tree
        local node
        if item.value ~= nil then
            node = parent:add(item.field, item.range, item.value)
        else
            node = parent:add(item.field, item.range)
        end
        if item.field == f.versions or item.field == f.version then
            node:append_text(" (" .. version_string(item.range:uint()) .. ")")
        elseif item.field == f.at_ms then
            local ms = item.range:uint64()
            local secs = (ms / 1000):tonumber()
            node:append_text(string.format(" (%s.%03d UTC)",
                os.date("!%Y-%m-%d %H:%M:%S", secs), (ms % 1000):tonumber()))
        end
        nodes[i] = node
    end
end

-- Appends a message's label to the Info column. The first of a packet's
-- messages replaces TCP's text; TCP may call the dissector again for the
-- bytes after a reassembled frame (with a fence after our text), so the
-- Protocol column tells whether this packet already has a label of ours.
local function info(pinfo, text)
    if tostring(pinfo.cols.protocol) ~= "chatpipe" then
        pinfo.cols.protocol = "chatpipe"
        pinfo.cols.info:set(text)
    else
        pinfo.cols.info:append(", " .. text)
    end
end

-- Dissects one whole frame (header and payload).
local function dissect_frame(frame, pinfo, tree)
    local len = frame:len() - 4
    local payload = frame(4, len):tvb()
    local msg = decode_payload(payload)
    local label = msg.summary ~= "" and (msg.name .. " " .. msg.summary) or msg.name
    if msg.err then
        label = msg.name .. " [malformed]"
    end
    local subtree = tree:add(chatpipe, frame(), "chatpipe " .. msg.name)
    subtree:add(f.len, frame(0, 4))
    add_items(subtree, msg.items)
    if msg.err then
        if msg.err.range then
            subtree:add_tvb_expert_info(msg.err.expert, msg.err.range, msg.err.text)
        else
            subtree:add_proto_expert_info(msg.err.expert, msg.err.text)
        end
        subtree:append_text(" [malformed]")
    elseif msg.note then
        if msg.note.range then
            subtree:add_tvb_expert_info(msg.note.expert, msg.note.range, msg.note.text)
        else
            subtree:add_proto_expert_info(msg.note.expert, msg.note.text)
        end
    end
    if msg.summary ~= "" and not msg.err then
        subtree:append_text(": " .. msg.summary)
    end
    info(pinfo, label)
end

-- The TCP payload: every whole frame in it; asks TCP for more bytes when
-- the last one is not whole.
function chatpipe.dissector(tvb, pinfo, tree)
    local total = tvb:len()
    local offset = 0
    while offset < total do
        local left = total - offset
        if left < 4 then
            pinfo.desegment_offset = offset
            pinfo.desegment_len = DESEGMENT_ONE_MORE_SEGMENT
            return total
        end
        local len = tvb(offset, 4):uint()
        if len > chatpipe.prefs.max_frame then
            -- A peer closes the connection here; nothing after it can be
            -- trusted to be on a frame boundary.
            local subtree = tree:add(chatpipe, tvb(offset), "chatpipe frame too large")
            subtree:add(f.len, tvb(offset, 4))
            subtree:add_tvb_expert_info(ef.too_large, tvb(offset, 4), string.format(
                "Payload length %d over the maximum of %d", len, chatpipe.prefs.max_frame))
            info(pinfo, string.format("Frame too large (%d bytes)", len))
            return total
        end
        if left < 4 + len then
            pinfo.desegment_offset = offset
            pinfo.desegment_len = 4 + len - left
            return total
        end
        dissect_frame(tvb(offset, 4 + len):tvb(), pinfo, tree)
        offset = offset + 4 + len
    end
    return offset
end

-- Claims a TCP conversation whose segment starts with a whole frame of a
-- known type that decodes cleanly.
local function heuristic(tvb, pinfo, tree)
    if not chatpipe.prefs.heuristic or tvb:len() < 8 then
        return false
    end
    local len = tvb(0, 4):uint()
    if len < 4 or len > chatpipe.prefs.max_frame or tvb:len() < 4 + len then
        return false
    end
    local msg = decode_payload(tvb(4, len):tvb())
    if not msg.known or msg.err or msg.note then
        return false
    end
    pinfo.conversation = chatpipe
    chatpipe.dissector(tvb, pinfo, tree)
    return true
end

local tcp_port_table = DissectorTable.get("tcp.port")
local registered_port = 0

function chatpipe.prefs_changed()
    local port = chatpipe.prefs.tcp_port
    if port ~= registered_port then
        if registered_port ~= 0 then
            tcp_port_table:remove(registered_port, chatpipe)
        end
        if port ~= 0 then
            tcp_port_table:add(port, chatpipe)
        end
        registered_port = port
    end
end

tcp_port_table:add(DEFAULT_PORT, chatpipe)
registered_port = DEFAULT_PORT
chatpipe:register_heuristic("tcp", heuristic)

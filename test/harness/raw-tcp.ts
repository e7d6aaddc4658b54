// A TCP client that never calls connect(): segments built by hand and sent on a
// raw socket (what NET_RAW, in most runtimes' default capabilities, allows a
// pod), so no cgroup/connect4 program sees them. python3's raw sockets, run
// where commandFrom places it.
import { commandFrom, type ProcessPlace } from './cgroups.js';

const CLIENT = String.raw`
import json, random, select, socket, struct, sys, time
src, dst, port, request = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()

def checksum(data):
    data += b'\0' * (len(data) % 2)
    total = sum(struct.unpack('!%dH' % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return ~total & 0xffff

def segment(sport, seq, ack, flags, payload=b''):
    head = struct.pack('!HHIIBBHHH', sport, port, seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = struct.pack('!4s4sBBH', socket.inet_aton(src), socket.inet_aton(dst), 0, socket.IPPROTO_TCP, len(head) + len(payload))
    return head[:16] + struct.pack('!H', checksum(pseudo + head + payload)) + head[18:] + payload

raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
sport, seq = random.randint(40000, 60000), random.getrandbits(31)

def receive(deadline):
    """The next segment from dst:port to our port before the deadline: (seq, flags, payload), or None."""
    while True:
        ready = select.select([raw], [], [], max(0, deadline - time.time()))[0]
        if not ready:
            return None
        packet = raw.recv(65535)
        ihl = (packet[0] & 0xf) * 4
        sp, dp, sq, _, offset, flags = struct.unpack('!HHIIBB', packet[ihl:ihl + 14])
        if socket.inet_ntoa(packet[12:16]) == dst and sp == port and dp == sport:
            return sq, flags, packet[ihl + (offset >> 4) * 4:]

raw.sendto(segment(sport, seq, 0, 0x02), (dst, 0))
synack = receive(time.time() + 2)
result = {'synAck': bool(synack and synack[1] & 0x12 == 0x12)}
if result['synAck'] and request:
    ack = (synack[0] + 1) & 0xffffffff
    raw.sendto(segment(sport, seq + 1, ack, 0x10), (dst, 0))
    raw.sendto(segment(sport, seq + 1, ack, 0x18, request), (dst, 0))
    answer, deadline = b'', time.time() + 3
    while b'\r\n' not in answer:
        got = receive(deadline)
        if got is None:
            break
        answer += got[2]
    result['statusLine'] = answer.split(b'\r\n')[0].decode(errors='replace')
print(json.dumps(result))
`;

export interface RawTcpResult {
  /** The SYN was answered. */
  synAck: boolean;
  /** The answer's first line, when a request was sent over the handshake. */
  statusLine?: string;
}

/**
 * A SYN from `src` to dst:port on a raw socket; when it is answered and `request` is given, the handshake
 * completed by hand and the request sent. The local kernel knows no such connection and answers the SYN-ACK
 * with a reset: where the request must get through, the caller drops the resets of its own namespace.
 */
export async function rawTcp(place: ProcessPlace, o: { src: string; dst: string; port: number; request?: string }): Promise<RawTcpResult> {
  return JSON.parse(await commandFrom(place, ['python3', '-c', CLIENT, o.src, o.dst, String(o.port), o.request ?? ''])) as RawTcpResult;
}

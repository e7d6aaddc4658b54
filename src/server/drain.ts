// Draining a node:http server so that no client sees a reset. http.Server.close()
// (node 19 and later) also closes every connection it counts as idle, and that
// includes one accepted a moment ago whose request is in the socket but not yet
// read: its client, having sent the request, gets ECONNRESET. After a restart or
// a handoff the listener lives on in the next process, so nothing is lost by
// letting those few connections have their one answer first.
import http from 'node:http';
import net, { type Socket } from 'node:net';

interface Use {
  answered: number;
  inFlight: number;
}

export interface Drainable {
  /** Stops accepting; every connection goes once it has had an answer and has nothing in flight; the rest are cut at drainMs. */
  drain(drainMs: number): Promise<void>;
}

/** Follows `server`'s connections from now on; call before it listens. */
export function drainable(server: http.Server): Drainable {
  const uses = new Map<Socket, Use>();
  let closing = false;
  server.on('connection', (socket: Socket) => {
    uses.set(socket, { answered: 0, inFlight: 0 });
    socket.once('close', () => uses.delete(socket));
  });
  // Before the handler: once closing, every answer ends its connection.
  server.prependListener('request', (req: http.IncomingMessage, res: http.ServerResponse) => {
    const use = uses.get(req.socket);
    if (use) use.inFlight++;
    if (closing) res.setHeader('Connection', 'close');
    res.once('close', () => {
      if (!use) return;
      use.inFlight--;
      use.answered++;
      if (closing && use.inFlight === 0) req.socket.end();
    });
  });
  return {
    async drain(drainMs) {
      closing = true;
      // net.Server's close: no new connections, and none of http's closing of "idle" ones.
      const closed = new Promise<void>((resolve) => net.Server.prototype.close.call(server, () => resolve()));
      for (const [socket, use] of uses) {
        if (use.answered > 0 && use.inFlight === 0) socket.end();
      }
      const deadline = setTimeout(() => server.closeAllConnections(), drainMs);
      await closed;
      clearTimeout(deadline);
    },
  };
}

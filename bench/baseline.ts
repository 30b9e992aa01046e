// The bare node:net responder that smtp521 is measured against: smtp521's
// happy path in `greet` mode (521 greeting, 521 to every line, 221 to QUIT
// then close) with nothing else: no limits, no time-outs, no logs. It is what
// any node:net server on this runtime must at least spend, so the ratio
// smtp521 / baseline isolates smtp521's own cost. Plain TypeScript on
// node:net only, so the same file runs on Node 24, Deno and Bun.
//
//   <runtime> bench/baseline.ts --listen 127.0.0.1:0 --hostname bench.example

import { createServer } from "node:net";
import type { AddressInfo, Socket } from "node:net";
import process from "node:process";
import { announce, CLOSING, HEAD, LF, LISTEN, REFUSE, runtime } from "./responder.ts";

function respond(socket: Socket): void {
  // The start of the current line only: the responder keeps O(1) state per
  // connection and never buffers a long line (there is no limit to enforce).
  let head = "";
  socket.on("error", () => {}); // without it a client reset kills Node and Deno
  socket.on("data", (chunk: Buffer) => {
    let start = 0;
    for (let lf = chunk.indexOf(LF); lf >= 0; lf = chunk.indexOf(LF, start)) {
      const line = head + chunk.toString("latin1", start, Math.min(lf, start + HEAD));
      head = "";
      start = lf + 1;
      if (/^quit\r?$/i.test(line)) return void socket.end(CLOSING);
      socket.write(REFUSE);
    }
    if (head.length < HEAD) head += chunk.toString("latin1", start, Math.min(chunk.length, start + HEAD));
  });
  socket.write(REFUSE);
}

const server = createServer(respond);
server.listen(LISTEN, () => {
  const address = server.address() as AddressInfo;
  announce(runtime(), "node:net", `${address.address}:${address.port}`);
});

// An orderly exit on SIGTERM (the default kills), so `node --cpu-prof` can write its profile.
process.on("SIGTERM", () => process.exit(0));

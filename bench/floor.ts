// The floor: the bare baseline plus the least per-session work SPEC asks of
// any server that does smtp521's job, and nothing else. It reads the client's
// address and port once per connection: SPEC §4 limits sessions per address
// and SPEC §6 logs `remote=`. It writes one session line per connection (SPEC
// §6) to stderr, 50 ms of lines at a time. It has no limits, time-outs, session
// core or lingering.
//
// floor / baseline is what that asked-for work costs a session; smtp521 /
// floor is what smtp521's own code costs beyond it. The targets of issue 7
// stay against the bare baseline. Plain node:net, so it runs on all three.
//
//   <runtime> bench/floor.ts --listen 127.0.0.1:0 --hostname bench.example

import { createServer } from "node:net";
import type { AddressInfo, Socket } from "node:net";
import process from "node:process";
import { announce, CLOSING, HEAD, LF, LISTEN, REFUSE, runtime } from "./responder.ts";

let pending = "";
let timer: ReturnType<typeof setTimeout> | undefined;

function flush(): void {
  timer = undefined;
  process.stderr.write(pending);
  pending = "";
}

/** The time as SPEC §6 writes it, the date and second formatted once a second. */
let second = -1;
let prefix = "";
function isoTime(now: number): string {
  if (Math.floor(now / 1000) !== second) {
    second = Math.floor(now / 1000);
    prefix = new Date(second * 1000).toISOString().slice(0, 20);
  }
  return `${prefix}${String(now % 1000).padStart(3, "0")}Z`;
}

function respond(socket: Socket, localPort: number): void {
  const remote = `${socket.remoteAddress}:${socket.remotePort}`; // 127.0.0.1 in the bench: no IPv6 brackets
  const started = Date.now();
  let lines = 0;
  let end = "client-closed";
  let head = "";
  socket.on("error", () => (end = "reset"));
  socket.on("close", () => {
    const now = Date.now();
    pending += `time=${isoTime(now)} event=session remote=${remote} local_port=${localPort} mode=greet ` +
      `duration_ms=${now - started} lines=${lines} end=${end}\n`;
    timer ??= setTimeout(flush, 50);
  });
  // The baseline's read loop, line for line, with the count and the end reason the session line needs. It is
  // repeated here rather than shared, so that the baseline's loop stays the bare one every run has measured.
  socket.on("data", (chunk: Buffer) => {
    let start = 0;
    for (let lf = chunk.indexOf(LF); lf >= 0; lf = chunk.indexOf(LF, start)) {
      const line = head + chunk.toString("latin1", start, Math.min(lf, start + HEAD));
      head = "";
      start = lf + 1;
      lines++;
      if (/^quit\r?$/i.test(line)) {
        end = "quit";
        return void socket.end(CLOSING);
      }
      socket.write(REFUSE);
    }
    if (head.length < HEAD) head += chunk.toString("latin1", start, Math.min(chunk.length, start + HEAD));
  });
  socket.write(REFUSE);
}

const server = createServer();
server.listen(LISTEN, () => {
  const address = server.address() as AddressInfo;
  server.on("connection", (socket: Socket) => respond(socket, address.port));
  announce(runtime(), "node:net", `${address.address}:${address.port}`);
});

process.on("SIGTERM", () => {
  if (pending) process.stderr.write(pending);
  process.exit(0);
});

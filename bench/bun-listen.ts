// The bare responder of bench/baseline.ts on Bun's native `Bun.listen`
// instead of node:net, to see whether the native path is worth it (issue 7,
// item 5). Same happy path, same start line; Bun only.
//
//   bun bench/bun-listen.ts --listen 127.0.0.1:0 --hostname bench.example

import { announce, CLOSING, HEAD, LF, LISTEN, REFUSE } from "./responder.ts";

// The few Bun APIs used, typed here: the project's tsconfig has Node's types only.
interface State {
  head: string;
}
interface BunSocket {
  data: State;
  write(data: string): number;
  end(data?: string): number;
}
interface BunListener {
  readonly hostname: string;
  readonly port: number;
}
interface BunApi {
  listen(options: {
    hostname: string;
    port: number;
    socket: {
      open(socket: BunSocket): void;
      data(socket: BunSocket, chunk: Buffer): void;
      error(socket: BunSocket, error: Error): void;
    };
  }): BunListener;
  version: string;
}
const bun = (globalThis as unknown as { Bun: BunApi }).Bun;

// The replies are 40-odd bytes on a fresh socket, which the kernel always
// takes whole, so a short write (Bun returns the count written) is not handled.
function data(socket: BunSocket, chunk: Buffer): void {
  const state = socket.data;
  let start = 0;
  for (let lf = chunk.indexOf(LF); lf >= 0; lf = chunk.indexOf(LF, start)) {
    const line = state.head + chunk.toString("latin1", start, Math.min(lf, start + HEAD));
    state.head = "";
    start = lf + 1;
    if (/^quit\r?$/i.test(line)) return void socket.end(CLOSING);
    socket.write(REFUSE);
  }
  if (state.head.length < HEAD) state.head += chunk.toString("latin1", start, Math.min(chunk.length, start + HEAD));
}

const listener = bun.listen({
  hostname: LISTEN.host,
  port: LISTEN.port,
  socket: {
    open(socket) {
      socket.data = { head: "" };
      socket.write(REFUSE);
    },
    data,
    error() {}, // a reset ends the socket; nothing to do
  },
});
announce(`bun/${bun.version}`, "Bun.listen", `${listener.hostname}:${listener.port}`);

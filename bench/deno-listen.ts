// The bare responder of bench/baseline.ts on Deno's native `Deno.listen`
// instead of node:net, to see whether the native path is worth it (issue 7,
// item 5). Same happy path, same start line; Deno only.
//
//   deno run --allow-net --no-prompt bench/deno-listen.ts --listen 127.0.0.1:0 --hostname bench.example

import { announce, CLOSING as CLOSING_TEXT, HEAD, LF, LISTEN, REFUSE as REFUSE_TEXT } from "./responder.ts";

// The few Deno APIs used, typed here: the project's tsconfig has Node's types only.
interface Conn {
  read(buffer: Uint8Array): Promise<number | null>;
  write(bytes: Uint8Array): Promise<number>;
  closeWrite(): Promise<void>;
  close(): void;
}
interface Listener extends AsyncIterable<Conn> {
  readonly addr: { readonly hostname: string; readonly port: number };
}
interface DenoApi {
  listen(options: { hostname: string; port: number }): Listener;
  version: { deno: string };
}
const deno = (globalThis as unknown as { Deno: DenoApi }).Deno;

const encoder = new TextEncoder();
const REFUSE = encoder.encode(REFUSE_TEXT);
const CLOSING = encoder.encode(CLOSING_TEXT);
/** One read buffer per connection; SMTP lines are at most 1000 octets. */
const READ_SIZE = 1024;
const latin1 = new TextDecoder("latin1");

/** `write` may take part of the bytes: loop until all are written. */
async function writeAll(conn: Conn, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
}

/** Replies for one chunk, and whether it held QUIT; `state.head` is the start of the current line. */
function scan(chunk: Uint8Array, state: { head: string }): { replies: number; quit: boolean } {
  let replies = 0;
  let start = 0;
  for (let lf = chunk.indexOf(LF); lf >= 0; lf = chunk.indexOf(LF, start)) {
    const line = state.head + latin1.decode(chunk.subarray(start, Math.min(lf, start + HEAD)));
    state.head = "";
    start = lf + 1;
    if (/^quit\r?$/i.test(line)) return { replies, quit: true };
    replies++;
  }
  if (state.head.length < HEAD) {
    state.head += latin1.decode(chunk.subarray(start, Math.min(chunk.length, start + HEAD)));
  }
  return { replies, quit: false };
}

async function respond(conn: Conn): Promise<void> {
  const buffer = new Uint8Array(READ_SIZE);
  const state = { head: "" };
  try {
    await writeAll(conn, REFUSE);
    for (let n = await conn.read(buffer); n !== null; n = await conn.read(buffer)) {
      const { replies, quit } = scan(buffer.subarray(0, n), state);
      for (let i = 0; i < replies; i++) await writeAll(conn, REFUSE);
      if (!quit) continue;
      await writeAll(conn, CLOSING);
      await conn.closeWrite(); // FIN after the 221, as node:net's end() does
      while (await conn.read(buffer) !== null); // until the client closes its side
      break;
    }
  } catch {
    // a reset or broken pipe: the connection is over either way
  } finally {
    try {
      conn.close();
    } catch {
      // already closed
    }
  }
}

const listener = deno.listen({ hostname: LISTEN.host, port: LISTEN.port });
announce(`deno/${deno.version.deno}`, "Deno.listen", `${listener.addr.hostname}:${listener.addr.port}`);
for await (const conn of listener) respond(conn);

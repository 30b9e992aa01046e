// The bare responders smtp521 is measured against (bench/README.md): smtp521's happy path in `greet`
// mode (521 greeting, 521 to every line, 221 to QUIT, then close) and nothing else, on the accept
// path smtp521 uses on this runtime (node:net; `Deno.listen` on Deno). With `--floor` it also does
// the least per-session work a conforming server must: it reads the client's address once (the
// per-address limit and `remote=`) and logs one session line per connection, 50 ms of lines per
// write, as smtp521 does.
//
//   <runtime> bench/bare.ts [--floor]    # on 127.0.0.1, any port: the start line names it

import { createServer } from "node:net";
import type { AddressInfo, Socket } from "node:net";
import process from "node:process";

const FLOOR = process.argv.includes("--floor");
const HOST = "127.0.0.1";
const NAME = "bench.example"; // smtp521's --hostname in the bench
const REFUSE = `521 ${NAME} does not accept mail\r\n`;
const CLOSING = `221 ${NAME} closing connection\r\n`;
/** A line is QUIT only if it is exactly that; 8 bytes are enough to tell. */
const HEAD = 8;
const LF = 10;

/** One connection: the start of its current line, and what the floor's session line needs. */
type Session = { head: string; remote: string; started: number; lines: number; end: string };

const open = (remote: () => string): Session => ({
  head: "",
  remote: FLOOR ? remote() : "",
  started: FLOOR ? Date.now() : 0,
  lines: 0,
  end: "client-closed",
});

/** Whether the chunk ended the session with QUIT; `reply` is called once per other line. */
function scan(session: Session, chunk: Buffer, reply: () => void): boolean {
  let start = 0;
  for (let lf = chunk.indexOf(LF); lf >= 0; lf = chunk.indexOf(LF, start)) {
    const line = session.head + chunk.toString("latin1", start, Math.min(lf, start + HEAD));
    session.head = "";
    start = lf + 1;
    session.lines++;
    if (/^quit\r?$/i.test(line)) return (session.end = "quit"), true;
    reply();
  }
  if (session.head.length < HEAD) {
    session.head += chunk.toString("latin1", start, Math.min(chunk.length, start + HEAD));
  }
  return false;
}

let pending = "";
let second = -1;
let prefix = "";
const flush = () => (process.stderr.write(pending), (pending = ""));
// An orderly exit on SIGTERM (the default kills), so `node --cpu-prof` can write its profile.
process.on("SIGTERM", () => (flush(), process.exit(0)));

/** The floor's session line, in smtp521's format; the date and second are formatted once a second. */
function logged(session: Session, localPort: number): void {
  if (!FLOOR) return;
  const now = Date.now();
  if (Math.floor(now / 1000) !== second) {
    second = Math.floor(now / 1000);
    prefix = new Date(second * 1000).toISOString().slice(0, 20);
  }
  if (!pending) setTimeout(flush, 50);
  const { remote, started, lines, end } = session;
  pending +=
    `time=${prefix}${String(now % 1000).padStart(3, "0")}Z event=session remote=${remote} ` +
    `local_port=${localPort} mode=greet duration_ms=${now - started} lines=${lines} end=${end}\n`;
}

/** The start line, in smtp521's format: bench/load.ts reads the port from it. */
const announce = (transport: string, address: string, boundPort: number) =>
  process.stderr.write(
    `time=${new Date().toISOString()} event=start impl=${transport}${FLOOR ? "+floor" : ""} ` +
      `listen=${address}:${boundPort} pid=${process.pid}\n`,
  );

function serveNode(): void {
  const server = createServer();
  server.listen({ host: HOST, port: 0 }, () => {
    const { address, port: bound } = server.address() as AddressInfo;
    server.on("connection", (socket: Socket) => {
      const session = open(() => `${socket.remoteAddress}:${socket.remotePort}`); // 127.0.0.1: no brackets
      socket.on("error", () => (session.end = "reset")); // without it a client reset kills Node and Deno
      if (FLOOR) socket.on("close", () => logged(session, bound));
      socket.on("data", (chunk: Buffer) => {
        if (scan(session, chunk, () => socket.write(REFUSE))) socket.end(CLOSING);
      });
      socket.write(REFUSE);
    });
    announce("node:net", address, bound);
  });
}

// The few Deno APIs used, typed here: the project's tsconfig has Node's types only.
interface DenoConn {
  readonly remoteAddr: { hostname: string; port: number };
  read(buffer: Uint8Array): Promise<number | null>;
  write(bytes: Uint8Array): Promise<number>;
  closeWrite(): Promise<void>;
  close(): void;
}
type DenoListen = (options: { hostname: string; port: number }) =>
  & AsyncIterable<DenoConn>
  & { addr: { port: number } };

async function writeAll(conn: DenoConn, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
}

/** One connection on `Deno.listen`, in that API's idiom: a read loop that awaits each write. */
async function respondDeno(conn: DenoConn, localPort: number): Promise<void> {
  const [refuse, closing] = [Buffer.from(REFUSE), Buffer.from(CLOSING)];
  const session = open(() => `${conn.remoteAddr.hostname}:${conn.remoteAddr.port}`);
  const buffer = Buffer.alloc(4096);
  try {
    await writeAll(conn, refuse);
    for (let n = await conn.read(buffer); n !== null; n = await conn.read(buffer)) {
      let replies = 0;
      const quit = scan(session, buffer.subarray(0, n), () => replies++);
      for (; replies > 0; replies--) await writeAll(conn, refuse);
      if (!quit) continue;
      await writeAll(conn, closing);
      await conn.closeWrite(); // FIN after the 221, as node:net's end() does
      while (await conn.read(buffer) !== null); // until the client closes its side
      break;
    }
  } catch {
    session.end = "reset";
  } finally {
    try {
      conn.close();
    } catch { /* already closed */ }
    logged(session, localPort);
  }
}

const deno = (globalThis as unknown as { Deno?: { listen: DenoListen } }).Deno;
if (!deno) serveNode();
else {
  const listener = deno.listen({ hostname: HOST, port: 0 });
  announce("Deno.listen", HOST, listener.addr.port);
  for await (const conn of listener) respondDeno(conn, listener.addr.port);
}

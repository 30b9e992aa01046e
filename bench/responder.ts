// What the three bare responders (baseline.ts on node:net, deno-listen.ts,
// bun-listen.ts) share, so that they cannot drift apart: their flags, their
// two replies, how much of a line tells QUIT, and their start line, whose
// `listen=` bench/proc.ts reads. Each keeps its own read loop, in the idiom of
// its API, since that loop is what is measured.

import process from "node:process";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: {
    listen: { type: "string", default: "127.0.0.1:0" },
    hostname: { type: "string", default: "bench.example" },
  },
});
const [, host, port] = /^(.*):(\d+)$/.exec(values.listen)!;

/** `--listen HOST:PORT`. */
export const LISTEN = { host, port: Number(port) };
export const REFUSE = `521 ${values.hostname} does not accept mail\r\n`;
export const CLOSING = `221 ${values.hostname} closing connection\r\n`;
/** A line is QUIT only if it is exactly that; 8 bytes are enough to tell. */
export const HEAD = 8;
export const LF = 10;

/** The start line, in the shape of smtp521's, so the bench reads every server alike. */
export function announce(runtime: string, impl: string, listen: string): void {
  process.stderr.write(
    `time=${
      new Date().toISOString()
    } event=start runtime=${runtime} impl=${impl} listen=${listen} pid=${process.pid}\n`,
  );
}

/** `node/24.21.0`, `deno/2.9.6`, `bun/1.4.5`: the start line's `runtime=`. */
export function runtime(): string {
  const global = globalThis as { Deno?: { version: { deno: string } }; Bun?: { version: string } };
  if (global.Deno) return `deno/${global.Deno.version.deno}`;
  return global.Bun ? `bun/${global.Bun.version}` : `node/${process.versions.node}`;
}

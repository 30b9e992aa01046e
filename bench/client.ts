// One load-generator process (bench/run.ts forks several, on Node 24, so the
// client side is the same whatever runtime the server is on). It takes jobs
// over the IPC channel and answers with results and its own CPU time, so the
// report can show the load generator was not the bottleneck. Every socket goes
// to 127.0.0.1 and every job is bounded in count and in time.

import { connect } from "node:net";
import type { Socket } from "node:net";
import { performance } from "node:perf_hooks";
import process from "node:process";

export const HOST = "127.0.0.1";
/** Any session or connect still open this long after its job's deadline is destroyed. */
const GRACE_MS = 5000;
/** Connections opened at once; the server's listen backlog is finite. */
const BATCH = 100;

export type Job =
  | { id: number; kind: "sessions"; port: number; name: string; concurrency: number; startAt: number; ms: number }
  | { id: number; kind: "hold"; port: number; count: number }
  | { id: number; kind: "release" }
  | { id: number; kind: "slowloris"; port: number; count: number; dripMs: number; lifeMs: number }
  | { id: number; kind: "longline"; port: number; bytes: number; maxMs: number }
  | { id: number; kind: "exit" };

export interface SessionsResult {
  /** Sessions that completed, with the right replies, inside the window. */
  sessions: number;
  failures: number;
  /** Greeting latency of each counted session, ms (connect() to the whole greeting line). */
  latencies: number[];
  /** This process's CPU time over the window, as a fraction of one core. */
  cpu: number;
}

export interface SlowlorisResult {
  connected: number;
  /** How many the server closed before the client's own bound. */
  closedByServer: number;
  maxLifeMs: number;
}

export interface LongLineResult {
  sent: number;
  replies: string;
  ms: number;
}

/** A message back to run.ts: `stage` names which step of the job it reports. */
export interface Reply {
  id: number;
  stage: string;
  result?: unknown;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));

/** One SMTP session: connect, greeting, QUIT, 221, the server's close. Resolves to the greeting latency or -1. */
function session(port: number, name: string, live: Set<Socket>): Promise<number> {
  const refuse = `521 ${name} does not accept mail\r\n`;
  const closing = `221 ${name} closing connection\r\n`;
  return new Promise((resolve) => {
    const begun = performance.now();
    const socket = connect({ host: HOST, port });
    let text = "";
    let greetMs = -1;
    let ok = false;
    live.add(socket);
    socket.on("data", (chunk: Buffer) => {
      text += chunk.toString("latin1");
      if (!text.endsWith("\r\n")) return; // a reply split across segments
      if (greetMs < 0) {
        greetMs = performance.now() - begun;
        if (text === refuse) socket.write("QUIT\r\n");
        else socket.destroy();
        text = "";
      } else ok = text === closing;
    });
    // The server closes after the 221; allowHalfOpen is off, so its FIN closes this side too.
    socket.on("error", () => (ok = false));
    socket.on("close", () => {
      live.delete(socket);
      resolve(ok ? greetMs : -1);
    });
  });
}

/** `concurrency` sequential session loops from `startAt` for `ms`; sessions ending after the window do not count. */
async function sessions(job: Extract<Job, { kind: "sessions" }>): Promise<SessionsResult> {
  await sleep(job.startAt - Date.now());
  const live = new Set<Socket>();
  const latencies: number[] = [];
  let failures = 0;
  const cpu0 = process.cpuUsage();
  const begun = performance.now();
  const deadline = begun + job.ms;
  const guard = setTimeout(() => live.forEach((socket) => socket.destroy()), job.ms + GRACE_MS);
  const loop = async () => {
    while (performance.now() < deadline) {
      const ms = await session(job.port, job.name, live);
      if (performance.now() > deadline) break;
      if (ms < 0) failures++;
      else latencies.push(Math.round(ms * 1000) / 1000);
    }
  };
  const loops = Array.from({ length: job.concurrency }, loop);
  await sleep(job.ms);
  const cpu = process.cpuUsage(cpu0);
  const wall = performance.now() - begun;
  await Promise.all(loops);
  clearTimeout(guard);
  return { sessions: latencies.length, failures, latencies, cpu: (cpu.user + cpu.system) / 1000 / wall };
}

/** Open one connection and resolve once the greeting has arrived (or null on failure or time-out). */
function greeted(port: number): Promise<Socket | null> {
  return new Promise((resolve) => {
    const socket = connect({ host: HOST, port });
    const fail = () => {
      clearTimeout(timer);
      socket.destroy();
      resolve(null);
    };
    const timer = setTimeout(fail, GRACE_MS);
    socket.once("data", () => {
      clearTimeout(timer);
      socket.off("error", fail);
      socket.on("error", () => {});
      resolve(socket);
    });
    socket.once("error", fail);
  });
}

/** `count` greeted connections, `BATCH` connects at a time. */
async function openMany(port: number, count: number): Promise<Socket[]> {
  const sockets: Socket[] = [];
  for (let i = 0; i < count; i += BATCH) {
    const batch = await Promise.all(Array.from({ length: Math.min(BATCH, count - i) }, () => greeted(port)));
    for (const socket of batch) if (socket) sockets.push(socket);
  }
  return sockets;
}

let held: Socket[] = [];

/** Open `count` more connections and keep them (until "release"); reports how many opened. */
async function hold(job: Extract<Job, { kind: "hold" }>): Promise<{ held: number }> {
  const opened = await openMany(job.port, job.count);
  held.push(...opened);
  return { held: opened.length };
}

function release(): { released: number } {
  for (const socket of held) socket.destroy();
  const released = held.length;
  held = [];
  return { released };
}

/**
 * Slowloris: every connection trickles one byte every `dripMs` and never ends
 * a line. The client destroys whatever is left after `lifeMs`, as the bare
 * baseline never closes them itself. Reports "connected" first, so the long
 * line can start while they trickle.
 */
async function slowloris(job: Extract<Job, { kind: "slowloris" }>, report: (stage: string) => void) {
  const sockets = await openMany(job.port, job.count);
  const begun = Date.now();
  let closedByServer = 0;
  let maxLifeMs = 0;
  let stopping = false;
  const lives = sockets.map((socket) =>
    new Promise<void>((resolve) =>
      socket.once("close", () => {
        if (!stopping) closedByServer++;
        maxLifeMs = Math.max(maxLifeMs, Date.now() - begun);
        resolve();
      })
    )
  );
  report("connected");
  const drip = setInterval(() => sockets.forEach((socket) => socket.writable && socket.write("X")), job.dripMs);
  await Promise.race([Promise.all(lives), sleep(job.lifeMs)]);
  stopping = true;
  clearInterval(drip);
  for (const socket of sockets) socket.destroy();
  await Promise.all(lives);
  return { connected: sockets.length, closedByServer, maxLifeMs } satisfies SlowlorisResult;
}

/** One line of `bytes` with no newline, as fast as the server reads it, until it closes or `maxMs`. */
async function longLine(job: Extract<Job, { kind: "longline" }>): Promise<LongLineResult> {
  const socket = await greeted(job.port);
  if (!socket) return { sent: 0, replies: "", ms: 0 };
  const begun = Date.now();
  let replies = "";
  let open = true;
  const closed = new Promise<void>((resolve) => socket.once("close", resolve)).then(() => (open = false));
  socket.on("data", (chunk: Buffer) => (replies += chunk.toString("latin1")));
  const chunk = Buffer.alloc(64 * 1024, "A");
  const expired = sleep(job.maxMs);
  let sent = 0;
  while (open && sent < job.bytes && Date.now() - begun < job.maxMs) {
    sent += chunk.length;
    if (!socket.write(chunk)) {
      await Promise.race([new Promise((resolve) => socket.once("drain", resolve)), closed, expired]);
    }
  }
  socket.end();
  await Promise.race([closed, sleep(GRACE_MS)]);
  socket.destroy();
  return { sent, replies, ms: Date.now() - begun };
}

async function perform(job: Job, report: (stage: string, result?: unknown) => void): Promise<void> {
  switch (job.kind) {
    case "sessions":
      return report("done", await sessions(job));
    case "hold":
      return report("done", await hold(job));
    case "release":
      return report("done", release());
    case "slowloris":
      return report("done", await slowloris(job, report));
    case "longline":
      return report("done", await longLine(job));
    case "exit":
      release();
      process.exit(0); // pending guard timers must not keep the process alive
  }
}

// Only as a forked child: the types above are shared with run.ts.
if (process.send) {
  process.on("message", (job: Job) => {
    const report = (stage: string, result?: unknown) => process.send!({ id: job.id, stage, result } satisfies Reply);
    perform(job, report).catch((error: Error) => report("error", String(error.stack ?? error)));
  });
}

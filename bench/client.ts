// One load-generator process: bench/load.ts forks them on Node 24, so the client side is the same
// whatever runtime the server is on. It takes jobs over the IPC channel and answers each with its
// result. Every socket goes to 127.0.0.1 and every job is bounded in count and in time.

import { connect } from "node:net";
import type { Socket } from "node:net";
import { performance } from "node:perf_hooks";
import process from "node:process";

/** Any socket of a job still open this long after the job's own bound is destroyed. */
const GRACE_MS = 5000;
/** Connections opened at once (the listen backlog is finite), and at most per job or loop. */
const BATCH = 100;
const MAX = 1_000_000;

/** A session: the start of the greeting expected, what is sent after it, the start of the last reply. */
export type Script = { greeting: string; send: string; closing: string };
/** Slowloris connections (a byte every `dripMs`, no newline, for at most `lifeMs`) and a long line. */
export type HostileLoad = { dripMs: number; lifeMs: number; lineBytes: number; lineMs: number };
type SessionsJob = { port: number; script: Script; concurrency: number; startAt: number };
type HostileJob = HostileLoad & { port: number; count: number };
export type Job =
  | SessionsJob & { kind: "sessions"; ms: number }
  | HostileJob & { kind: "hostile" }
  | { kind: "hold"; port: number; count: number }
  | { kind: "release" };

/** Sessions that completed with the right replies in the window (the greeting latency of each, ms),
 * those that did not, and this process's CPU over the window in cores. */
export type SessionsResult = { latencies: number[]; failures: number; cpu: number };
/** Slowloris connections made, how many the server closed first, bytes of the long line sent. */
export type HostileResult = { connected: number; closedByServer: number; lineSent: number };

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));

/** One session; resolves to its greeting latency (connect() to the whole greeting line), or -1 if it failed. */
function session(port: number, script: Script, live: Set<Socket>): Promise<number> {
  return new Promise((resolve) => {
    const begun = performance.now();
    const socket = connect({ host: "127.0.0.1", port });
    let text = "";
    let greetMs = -1;
    live.add(socket);
    socket.on("data", (chunk: Buffer) => {
      text = (text + chunk.toString("latin1")).slice(-600); // only the last reply is checked
      if (greetMs >= 0 || !text.endsWith("\r\n")) return; // a greeting split across segments
      greetMs = performance.now() - begun;
      if (text.startsWith(script.greeting)) socket.write(script.send);
      else socket.destroy();
      text = "";
    });
    // The server closes after its last reply; allowHalfOpen is off, so its FIN closes this side too.
    socket.on("error", () => (greetMs = -1));
    socket.on("close", () => {
      live.delete(socket);
      const last = text.slice(text.lastIndexOf("\n", text.length - 2) + 1);
      resolve(last.startsWith(script.closing) && last.endsWith("\r\n") ? greetMs : -1);
    });
  });
}

/** `concurrency` loops of sessions, one after another, from `startAt` for `ms`; sessions ending later do not count. */
async function sessions(job: SessionsJob & { ms: number }): Promise<SessionsResult> {
  await sleep(job.startAt - Date.now());
  const live = new Set<Socket>();
  const latencies: number[] = [];
  let failures = 0;
  const cpu0 = process.cpuUsage();
  const deadline = performance.now() + job.ms;
  const guard = setTimeout(() => live.forEach((socket) => socket.destroy()), job.ms + GRACE_MS);
  const loop = async () => {
    for (let n = 0; n < MAX && performance.now() < deadline; n++) {
      const ms = await session(job.port, job.script, live);
      if (performance.now() > deadline) break;
      if (ms < 0) failures++;
      else latencies.push(Math.round(ms * 1000) / 1000);
    }
  };
  const loops = Array.from({ length: job.concurrency }, loop);
  await sleep(job.ms);
  const cpu = process.cpuUsage(cpu0);
  await Promise.all(loops);
  clearTimeout(guard);
  return { latencies, failures, cpu: (cpu.user + cpu.system) / 1000 / job.ms };
}

/** `count` connections that got their greeting, `BATCH` connects at a time. */
async function openMany(port: number, count: number): Promise<Socket[]> {
  const greeted = () =>
    new Promise<Socket | null>((resolve) => {
      const socket = connect({ host: "127.0.0.1", port });
      const timer = setTimeout(() => socket.destroy(), GRACE_MS);
      socket.on("error", () => {});
      socket.once("close", () => (clearTimeout(timer), resolve(null)));
      socket.once("data", () => (clearTimeout(timer), resolve(socket)));
    });
  const sockets: Socket[] = [];
  for (let i = 0; i < Math.min(count, MAX); i += BATCH) {
    const batch = await Promise.all(Array.from({ length: Math.min(BATCH, count - i) }, greeted));
    sockets.push(...batch.filter((socket) => socket !== null));
  }
  return sockets;
}

/**
 * The slowloris connections and, once they are open, one line of `lineBytes` with no newline, as
 * fast as the server reads it, until it closes or `lineMs`. Reports how many connections the server
 * closed before the client did.
 */
async function hostile(job: HostileJob): Promise<HostileResult> {
  const sockets = await openMany(job.port, job.count);
  let closedByServer = 0;
  let stopping = false;
  const lives = sockets.map((socket) =>
    new Promise<void>((resolve) =>
      socket.once("close", () => (stopping || closedByServer++, resolve()))
    )
  );
  const drip = setInterval(() => sockets.forEach((s) => s.writable && s.write("X")), job.dripMs);
  let sent = 0;
  if (job.lineBytes > 0) {
    const [line] = await openMany(job.port, 1);
    const closed = new Promise((resolve) => line.once("close", resolve));
    const chunk = Buffer.alloc(64 * 1024, "A");
    const expired = sleep(job.lineMs);
    const until = Date.now() + job.lineMs;
    while (!line.destroyed && sent < job.lineBytes && Date.now() < until) {
      sent += chunk.length;
      if (!line.write(chunk)) {
        await Promise.race([new Promise((r) => line.once("drain", r)), closed, expired]);
      }
    }
    line.destroy();
  }
  await Promise.race([Promise.all(lives), sleep(job.lifeMs)]);
  stopping = true;
  clearInterval(drip);
  sockets.forEach((socket) => socket.destroy());
  await Promise.all(lives);
  return { connected: sockets.length, closedByServer, lineSent: sent };
}

const held: Socket[] = [];

/** A job's result: sessions and hostile as typed above, hold the connections it opened. */
async function perform(job: Job): Promise<unknown> {
  if (job.kind === "sessions") return await sessions(job);
  if (job.kind === "hostile") return await hostile(job);
  if (job.kind === "release") {
    for (const socket of held.splice(0)) socket.destroy();
    return 0;
  }
  const opened = await openMany(job.port, job.count);
  held.push(...opened);
  return opened.length;
}

// Only as a forked child: the types above are shared with load.ts.
if (process.send) {
  process.on("message", (job: Job) => {
    perform(job).then(
      (result) => process.send!({ result }),
      (error: Error) => process.send!({ error: String(error.stack ?? error) }),
    );
  });
}

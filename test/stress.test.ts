// Stress (README "Under hostile traffic") against the real file on Node 24 and Deno: slowloris, a
// 100 MB line, a reset storm, pipeliners that never read, and a flood over
// --max-connections. Bounded: at most about 30 s a runtime, 127.0.0.1 only.
// The figures go to stderr for the issue notes; the assertions are the
// issue's bounds.

import { readdirSync, readFileSync } from "node:fs";
import { connect, type Socket } from "node:net";
import { describe, expect, it } from "vitest";
import { greeting, type Running, start, talk, until } from "./helpers.ts";

const NAME = "mx.example";
const MB = 1024 * 1024;
/**
 * The issue's bound is 20 MB. Deno 2.9.6's node:net keeps memory per socket
 * it has served: a 10-line node:net responder on Deno grows about 17 MB from
 * the slowloris phase alone, and 200 resets add about 6 MB more (README,
 * "Known limits"). Deno is held to the bound plus that runtime cost.
 */
const RSS_BOUND = { node: 20 * MB, deno: 30 * MB } as const;

const rss = (pid: number) =>
  Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]) * 1024;
/** Bytes the process has read through read-like system calls, sockets included. */
const bytesRead = (pid: number) =>
  Number(/^rchar: (\d+)/m.exec(readFileSync(`/proc/${pid}/io`, "utf8"))![1]);
/** The descriptors the process holds open. */
const descriptors = (pid: number) => readdirSync(`/proc/${pid}/fd`).length;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Run `make` for 0..n-1, `batch` at a time (the listen backlog is finite). */
async function inBatches<T>(
  n: number,
  batch: number,
  make: (i: number) => Promise<T>,
): Promise<T[]> {
  const results: T[] = [];
  for (let i = 0; i < n; i += batch) {
    results.push(
      ...await Promise.all(Array.from({ length: Math.min(batch, n - i) }, (_, j) => make(i + j))),
    );
  }
  return results;
}

/** Connect and resolve once connected (the returned promise says when the server closed it). */
function open(port: number): Promise<{ socket: Socket; closed: Promise<number> }> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: "127.0.0.1", port });
    const begun = Date.now();
    const closed = new Promise<number>((done) =>
      socket.on("close", () => done(Date.now() - begun))
    );
    socket.on("error", () => {});
    socket.once("connect", () => resolve({ socket, closed }));
    setTimeout(() => reject(new Error("connect took over 5 s")), 5000).unref();
  });
}

/**
 * A client that trickles one byte every 300 ms and never ends a line; resolves with its lifetime.
 * The guard (15 s) is far past the server's 2 s time-out, so a lifetime near it means the server
 * never closed the connection.
 */
async function slowloris(
  { socket, closed }: { socket: Socket; closed: Promise<number> },
): Promise<number> {
  socket.resume();
  const drip = setInterval(() => socket.writable && socket.write("X"), 300);
  const guard = setTimeout(() => socket.destroy(), 15_000);
  const lived = await closed;
  clearInterval(drip);
  clearTimeout(guard);
  return lived;
}

/** Send up to `total` bytes with no end of line, as fast as the server takes them. */
async function longLine(
  port: number,
  total: number,
): Promise<{ sent: number; text: string; replyMs: number }> {
  const { socket, closed } = await open(port);
  let text = "";
  let replyMs = -1;
  const begun = Date.now();
  socket.on("data", (chunk) => {
    text += chunk.toString("latin1");
    if (text.split("\r\n").length > 2 && replyMs < 0) replyMs = Date.now() - begun;
  });
  const chunk = Buffer.alloc(64 * 1024, 0x41);
  let sent = 0;
  let open_ = true;
  void closed.then(() => (open_ = false));
  while (open_ && sent < total) {
    sent += chunk.length;
    if (!socket.write(chunk)) {
      await Promise.race([
        new Promise((resolve) => socket.once("drain", resolve)),
        closed,
        sleep(3000),
      ]);
    }
  }
  socket.end();
  await Promise.race([closed, sleep(5000)]);
  socket.destroy();
  return { sent, text, replyMs };
}

async function resetStorm(port: number, n: number) {
  await inBatches(n, 100, async (i) => {
    const { socket } = await open(port);
    if (i % 2) {
      await new Promise((resolve) => socket.once("data", resolve));
      socket.write("NOOP\r\nNOO");
    }
    socket.resetAndDestroy();
  });
}

/** Pipeline `lines` commands without ever reading a reply; the server's log tells how it ended. */
async function nonReader(port: number, lines: number): Promise<Socket> {
  const { socket } = await open(port);
  socket.pause();
  socket.write("NOOP\r\n".repeat(lines));
  return socket;
}

/** Alive, and a fresh session still gets the whole dialog. */
async function settle(server: Running) {
  expect(server.child.exitCode).toBe(null);
  const fresh = await talk(server.port, "QUIT\r\n");
  expect(fresh.text).toBe(greeting(NAME) + `221 ${NAME} closing connection\r\n`);
}

describe.each(["node", "deno"] as const)("stress against the real file on %s", (runtime) => {
  it(
    "slowloris, a 100 MB line, a reset storm and non-readers: alive, and RSS grows < 20 MB (Deno: 30)",
    async () => {
      const server = await start(runtime, [
        "--hostname",
        NAME,
        "--timeout",
        "2",
        "--max-connections",
        "1500",
        "--max-per-ip",
        "100000",
      ]);
      let sampler: ReturnType<typeof setInterval> | undefined;
      try {
        // Warm up with a little of each load, so that what follows measures growth, not start-up.
        await inBatches(50, 10, () => talk(server.port, "QUIT\r\n"));
        await Promise.all((await inBatches(100, 100, () => open(server.port))).map(slowloris));
        await longLine(server.port, 16 * MB);
        await resetStorm(server.port, 20);
        await sleep(500);
        const before = rss(server.child.pid!);
        let peak = before;
        sampler = setInterval(() => (peak = Math.max(peak, rss(server.child.pid!))), 100);

        const begun = Date.now();
        const connected = await inBatches(1000, 250, () => open(server.port)); // all 1000 at once
        const lives = await Promise.all(connected.map(slowloris));
        const slowMs = Date.now() - begun;
        const phases = [`slowloris ${((rss(server.child.pid!) - before) / MB).toFixed(1)}`];
        // Every one closed by the server at its 2 s time-out: never before; at most 8 s after connecting
        // (1000 connections at once on a busy machine), well short of the 15 s guard.
        expect(Math.max(...lives)).toBeLessThan(8000);
        expect(Math.min(...lives)).toBeGreaterThanOrEqual(1900);

        const readBefore = bytesRead(server.child.pid!);
        const line = await longLine(server.port, 100 * MB);
        expect(line.text).toBe(greeting(NAME).repeat(2)); // greeting, then one 521 for the overlong line
        // The server lingers 2 s reading, but discards at most 64 KB of a flood. Read in all: the chunk with the
        // overlong line (64 KB), the 64 KB discarded, the chunk that crosses it and what node:net reads ahead
        // into its buffer (64 KB); unbounded, it was 5-23 MB. rchar counts read(2), which Node uses for
        // sockets; Deno uses recv(2), which rchar does not count, so there its RSS bound is the check.
        const read = bytesRead(server.child.pid!) - readBefore;
        if (runtime === "node") expect(read).toBeGreaterThan(1000); // the measure sees the line itself
        if (runtime === "node") expect(read).toBeLessThan(512 * 1024);
        await server.waitFor(/lines=0 end=too-long$/);
        phases.push(`long line ${((rss(server.child.pid!) - before) / MB).toFixed(1)}`);

        await resetStorm(server.port, 200);
        phases.push(`resets ${((rss(server.child.pid!) - before) / MB).toFixed(1)}`);
        const readers = await inBatches(100, 100, () => nonReader(server.port, 1000));
        // Answered up to --max-commands, lingered 2 s, closed: the server holds nothing for them.
        await until(
          () => server.log.filter((l) => / lines=20 end=limit$/.test(l)).length === 100,
          20_000,
          "100 limits",
        );
        const limited = server.log.filter((l) => / lines=20 end=limit$/.test(l));
        // The 2 s linger bounds each; 3 s allows for a loaded machine's timers (a reader held open would reach 20 s).
        expect(Math.max(...limited.map((l) => Number(/duration_ms=(\d+)/.exec(l)![1]))))
          .toBeLessThan(3000);
        for (const socket of readers) socket.destroy();

        await settle(server);
        await sleep(500); // a measurement, not a wait for an event: let the runtime return what it freed
        const after = rss(server.child.pid!);
        console.error(
          `stress ${runtime}: 1000 slowloris closed in ${Math.min(...lives)}-${
            Math.max(...lives)
          } ms (all in ${slowMs} ms); ` +
            `100 MB line: ${(line.sent / MB).toFixed(0)} MB sent, ${
              (read / 1024).toFixed(0)
            } KB read, 521 after ${line.replyMs} ms; ` +
            `RSS ${(before / MB).toFixed(1)} -> peak ${(peak / MB).toFixed(1)} -> ${
              (after / MB).toFixed(1)
            } MB; ` +
            `growth after each phase (MB): ${phases.join(", ")}`,
        );
        expect(after - before).toBeLessThan(RSS_BOUND[runtime]);
      } finally {
        clearInterval(sampler);
        expect(await server.stop()).toBe(0);
      }
    },
    30_000,
  );

  it(
    "2000 connections against --max-connections 100: every one reads a 521, RSS grows < 20 MB (Deno: 30)",
    async () => {
      const server = await start(runtime, [
        "--hostname",
        NAME,
        "--max-connections",
        "100",
        "--max-per-ip",
        "100000",
      ]);
      try {
        await inBatches(200, 50, () => talk(server.port, "QUIT\r\n")); // warm up, below the limit
        const sessions = () => server.log.filter((l) => l.includes("event=session")).length;
        await until(() => sessions() === 200, 20_000, "the warm-up sessions to close");
        const overloads = () => server.log.filter((l) => l.endsWith("end=overload")).length;
        const overloadedBefore = overloads(); // none, unless warm-up sessions lingered past the limit
        const fdsBefore = descriptors(server.child.pid!); // every warm-up session closed
        // 100 sessions fill --max-connections and stay; then 2000 more connect. Each holder is a
        // session, not an over-limit connection: it gets a reply to a line (those get none).
        const holders = await inBatches(100, 100, async () => {
          const { socket } = await open(server.port);
          let text = "";
          socket.on("data", (chunk) => (text += chunk.toString("latin1")));
          await until(() => text === greeting(NAME), 15_000, "the greeting");
          socket.write("NOOP\r\n");
          await until(() => text === greeting(NAME).repeat(2), 15_000, "the reply to NOOP");
          return socket;
        });
        expect(overloads()).toBe(overloadedBefore);
        const before = rss(server.child.pid!);
        const begun = Date.now();
        const clients = await inBatches(2000, 250, () => talk(server.port, "", { ms: 15_000 }));
        const ms = Date.now() - begun;
        expect(clients.filter((c) => c.text === greeting(NAME) && c.ending === "fin").length).toBe(
          2000,
        );
        for (const socket of holders) socket.destroy();
        // Every socket of the flood and the holders closed: the server holds as many descriptors as before them.
        await until(
          () => descriptors(server.child.pid!) <= fdsBefore,
          20_000,
          "the server to close every socket",
        );
        await settle(server);
        await sleep(500); // a measurement, not a wait for an event: let the runtime return what it freed
        const after = rss(server.child.pid!);
        // The server's own count, in its stop line: every one of the 2000 ended as an overload. Its log
        // may drop lines while the reader (this busy process) lags; it counts them, and the lines written
        // and the lines dropped add up to every session.
        expect(await server.stop()).toBe(0);
        const stop = server.log.find((l) => l.includes("event=stop"))!;
        const overload = Number(/ overload=(\d+)/.exec(stop)?.[1]) - overloadedBefore;
        const dropped = Number(/ log_dropped=(\d+)/.exec(stop)?.[1] ?? 0);
        console.error(
          `flood ${runtime}: 2000 connections in ${ms} ms, all read the 521, ${overload} ended as overload, ` +
            `${overloads() - overloadedBefore} logged as such, ${dropped} log lines dropped; ` +
            `RSS ${(before / MB).toFixed(1)} -> ${(after / MB).toFixed(1)} MB`,
        );
        expect(overload, stop).toBe(2000);
        expect(sessions() + dropped, stop).toBe(Number(/ sessions=(\d+)/.exec(stop)?.[1]));
        expect(after - before).toBeLessThan(RSS_BOUND[runtime]);
      } finally {
        expect(await server.stop()).toBe(0);
      }
    },
    30_000,
  );
});

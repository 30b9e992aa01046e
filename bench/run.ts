// The benchmark (bench/README.md): smtp521 against the floor on Node 24, Deno and Bun, one server at
// a time, the load generator on CPU 0 and the server on CPU 1. Nothing here asserts about time;
// every figure is a ratio taken within one repeat or one server.
//
//   npm run bench              # full run (~9 min): bench/RESULTS.md; raw figures and logs in bench/out/
//   node bench/run.ts --smoke  # tiny counts, under a minute; into a temporary directory only
//   --out DIR                  # RESULTS.md, results.json and the logs into DIR
//   --runtimes node,bun  --phases speed,memory,hostile,lines,small  --concurrencies 1,16  --repeats N
//   --product /tmp/patched.ts  # measure another copy of smtp521.ts as "smtp521"
//   --no-pin                   # servers and load generator share the cores (HISTORY.md, 12)
//   --from DIR/results.json    # RESULTS.md again from a run's raw figures, measuring nothing

import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import process from "node:process";
import { parseArgs } from "node:util";
import * as load from "./load.ts";
import { type Bench, type Impl, measureRate, type Runtime, sleep, withServer } from "./load.ts";
import { type Line, markdown, type Raw, type Sample, type Small } from "./report.ts";

const MB = 1024 * 1024;

/** Every setting, as [full run, smoke run]. */
const SETTINGS = {
  /** Memory and hostile: fresh processes per repeat. */
  repeats: [3, 1],
  /** Speed: windows per server at each concurrency, the three servers' windows interleaved. */
  rounds: [10, 1],
  /** Load-generator processes (all on CPU 0). */
  processes: [2, 2],
  concurrencies: [[1, 16, 128], [1, 16, 128]],
  /** Speed: a warm-up at 16 clients (Deno's JIT still tiers up in the first seconds: HISTORY.md,
   * 8), then windows of `rateMs`. */
  rateWarmMs: [2500, 100],
  rateMs: [750, 200],
  /** Memory: idle connections held per step (two steps); RSS readings per figure; the pause before. */
  hold: [5000, 500],
  settleMs: [1000, 100],
  rssSamples: [5, 1],
  /** Hostile: slowloris clients and one long line; smtp521's --timeout closes the slowloris itself. */
  slowloris: [1000, 50],
  dripMs: [300, 100],
  lifeMs: [4000, 400],
  lineBytes: [100 * MB, 4 * MB],
  lineMs: [10_000, 2000],
  timeoutS: [2, 2],
  /** Adversarial lines: rounds over the shapes, a window per shape and round at 4 clients. */
  lineRounds: [3, 1],
  lineWindowMs: [300, 300],
  /** Small hosts: starts timed per flag variant, a window at 16 clients, connections held. */
  starts: [3, 1],
  smallRateMs: [2000, 200],
  smallHold: [1000, 100],
};
export type Config = { [K in keyof typeof SETTINGS]: (typeof SETTINGS)[K][number] };
const settings = (smoke: boolean) =>
  Object.fromEntries(Object.entries(SETTINGS).map(([k, v]) => [k, v[smoke ? 1 : 0]])) as Config;

/** The runtime flags tried for a small host (bench/README.md); the first of each runtime is none. */
const SEMI = "--max-semi-space-size=1";
export const VARIANTS: Record<Runtime, string[][]> = {
  node: [[], [SEMI], [SEMI, "--single-threaded-gc", "--v8-pool-size=0"]],
  deno: [[], [`--v8-flags=${SEMI}`], [`--v8-flags=${SEMI},--single-threaded-gc`]],
  bun: [[], ["--smol"]],
};

const cut = (line: string) => line.slice(0, 998);
/** Three labels of 63 a's and one of `last`: a domain of 192 + `last` octets. */
const domain = (last: number) => [63, 63, 63, last].map((n) => "a".repeat(n)).join(".");

/**
 * The lines, without their CRLF: the two NOOPs, the dearest valid line (a RCPT whose domain is
 * checked and named in the reply, RFC 1846 §3), then the adversarial shapes of issue 15.
 */
export const SHAPES: [string, string][] = [
  ["NOOP (4 octets)", "NOOP"],
  ["NOOP + 993 x", cut(`NOOP ${"x".repeat(993)}`)],
  [
    "RCPT TO: + a 256-octet path + parameters",
    cut(`RCPT TO:<u@${domain(60)}> ${"X-P=v ".repeat(130)}`),
  ],
  ["RCPT TO:< + tabs", cut(`RCPT TO:<${"\t".repeat(990)}`)],
  ["NOOP + spaces + x", cut(`NOOP${" ".repeat(990)}x`)],
  ["A x 990 (an unknown verb)", "A".repeat(990)],
  ["RCPT TO:< + @", cut(`RCPT TO:<${"@".repeat(990)}`)],
  ["RCPT TO:<@ + :", cut(`RCPT TO:<@${":".repeat(990)}`)],
  ["MAIL FROM: + <", cut(`MAIL FROM:${"<".repeat(990)}`)],
  ["RCPT TO:<u@[ + [", cut(`RCPT TO:<u@[${"[".repeat(990)}`)],
  ["RCPT TO:<u@[IPv6:fe80::1% + %", cut(`RCPT TO:<u@[IPv6:fe80::1%${"%".repeat(990)}`)],
  ['RCPT TO:< + "', cut(`RCPT TO:<${'"'.repeat(990)}`)],
  ["RCPT TO:< + \\", cut(`RCPT TO:<${"\\".repeat(990)}`)],
  ["RCPT TO:<u@ + a. x 490 + >", cut(`RCPT TO:<u@${"a.".repeat(490)}>`)],
  ["RCPT TO:<u@a + - x 970 + >", cut(`RCPT TO:<u@a${"-".repeat(970)}>`)],
  ["RCPT TO:<u@ + a valid 253-octet domain + >", `RCPT TO:<u@${domain(61)}>`],
];

const PHASES = ["speed", "memory", "hostile", "lines", "small"] as const;
/** The servers of the speed phase, and of the memory phase (its order reversed every repeat). */
const RATED = ["floor", "smtp521", "control"] as const;
const HELD: Impl[] = ["baseline", "smtp521"];

const begun = Date.now();
const progress = (text: string) =>
  process.stderr.write(
    `bench ${((Date.now() - begun) / 1000).toFixed(0).padStart(4)} s: ${text}\n`,
  );

/**
 * Speed: floor, smtp521 and control run at once (each idle while another is measured) and take
 * turns, a window each per round, first place rotating: a ratio compares windows seconds apart, not
 * processes minutes apart (HISTORY.md, 18). Each window's rate goes to its server's sample.
 */
const speedPhase = (b: Bench, sample: (impl: Impl, round: number) => Sample) =>
  withServer(
    b,
    "floor",
    "speed",
    (floor) =>
      withServer(b, "smtp521", "speed", (smtp521) =>
        withServer(b, "control", "speed", async (control) => {
          const { config } = b;
          const servers = { floor, smtp521, control };
          for (const impl of RATED) {
            await measureRate(servers[impl], 16, config.rateWarmMs);
          }
          for (const clients of config.concurrencies) {
            for (let round = 0; round < config.rounds; round++) {
              const turn = round % RATED.length;
              for (const impl of [...RATED.slice(turn), ...RATED.slice(0, turn)]) {
                const rate = await measureRate(servers[impl], clients, config.rateMs);
                sample(impl, round).rates[clients] = rate;
              }
            }
          }
        })),
  );

/** Idle RSS, then with `hold` and 2 x `hold` idle connections, on a fresh process with no warm-up (HISTORY.md, 1). */
const memoryPhase = (b: Bench, impl: Impl) =>
  withServer(b, impl, "memory", async (server) => {
    await sleep(b.config.settleMs);
    return await load.measureHeld(server, b.config.hold, 2, b.config);
  });

/** Peak RSS under slowloris plus a long line, on a server that has served sessions for a while. */
const hostilePhase = (b: Bench) =>
  withServer(b, "smtp521", "hostile", async (server) => {
    await measureRate(server, 8, b.config.rateMs);
    await sleep(b.config.settleMs);
    return await load.measureHostile(server, b.config);
  }, { extra: ["--timeout", String(b.config.timeoutS)] });

/** CPU per session of EHLO, MAIL, 100 lines of one shape and QUIT, pipelined, in rcpt mode; shapes interleaved. */
function linesPhase(b: Bench): Promise<Line[]> {
  const script = (line: string) => ({
    greeting: "220 ",
    send: `EHLO x\r\nMAIL FROM:<>\r\n${`${line}\r\n`.repeat(100)}QUIT\r\n`,
    closing: "221 ",
  });
  return withServer(b, "smtp521", "lines", async (server) => {
    const cpu: number[][] = SHAPES.map(() => []);
    await measureRate(server, 4, b.config.rateWarmMs, script(SHAPES[1][1]));
    for (let round = 0; round < b.config.lineRounds; round++) {
      const order = SHAPES.map((_, i) => i);
      for (const i of round % 2 ? order.reverse() : order) {
        const rate = await measureRate(server, 4, b.config.lineWindowMs, script(SHAPES[i][1]));
        if (rate.failures || !rate.sessionsPerS) {
          throw new Error(`lines: ${SHAPES[i][0]}: ${rate.failures} failed`);
        }
        cpu[i].push((1e6 * rate.serverCpu) / rate.sessionsPerS);
      }
    }
    return SHAPES.map(([name, line], i) => ({ name, octets: line.length + 2, cpu: cpu[i] }));
  }, { extra: ["--mode", "rcpt", "--max-commands", "1000"] });
}

/** Per flag variant: start-up to the start line, idle RSS, RSS after serving 16 clients and with connections held. */
async function smallPhase(b: Bench): Promise<Small[]> {
  const { config } = b;
  const result: Small[] = [];
  for (const flags of VARIANTS[b.runtime]) {
    const startMs: number[] = [];
    for (let i = 1; i < config.starts; i++) {
      startMs.push(await withServer(b, "smtp521", "small", (s) => s.startMs, { flags }));
    }
    result.push(
      await withServer(b, "smtp521", "small", async (server) => {
        const rss = () => load.settledRss(server.pid, config.rssSamples);
        startMs.push(server.startMs);
        await sleep(config.settleMs);
        const idle = await rss();
        const rate = await measureRate(server, 16, config.smallRateMs);
        await sleep(config.settleMs);
        const served = await rss();
        const held = (await load.measureHeld(server, config.smallHold, 1, config)).steps[0].rss;
        return { flags, startMs, idle, served, held, rate };
      }, { flags }),
    );
  }
  return result;
}

const sha = (file: string) =>
  createHash("sha256").update(readFileSync(file)).digest("hex").slice(0, 12);

function describeProduct(file: string): string {
  if (file !== load.PRODUCT) return `${file} (--product), sha256 ${sha(file)}`;
  const git = (...args: string[]) =>
    execFileSync("git", args, { cwd: load.ROOT, encoding: "utf8" }).trim();
  const dirty = git("status", "--porcelain", "smtp521.ts") ? " with uncommitted changes" : "";
  return `smtp521.ts at ${git("rev-parse", "--short", "HEAD")}${dirty}, sha256 ${sha(file)}`;
}

/** The names in a comma-separated `list` (all if none), each one of `all`. */
function pick<T extends string>(all: readonly T[], list?: string): T[] {
  const names = list?.split(",") ?? [...all];
  const unknown = names.filter((name) => !all.includes(name as T));
  if (unknown.length) throw new Error(`unknown ${unknown.join(", ")}: one of ${all.join(", ")}`);
  return names as T[];
}

const [text, flag] = [{ type: "string" }, { type: "boolean" }] as const;
const OPTIONS = {
  out: text,
  runtimes: text,
  phases: text,
  concurrencies: text,
  repeats: text,
  rounds: text,
  product: text,
  from: text,
  smoke: flag,
  "no-pin": flag,
};

export async function main(args: string[]): Promise<void> {
  const { values: v } = parseArgs({ args, options: OPTIONS });
  const out = v.out && resolve(v.out);
  if (v.from) {
    const raw: Raw = JSON.parse(readFileSync(v.from, "utf8"));
    // A smoke run's figures never replace the real ones.
    return write(out ?? (raw.context.smoke ? dirname(resolve(v.from)) : undefined), raw);
  }
  const config = settings(Boolean(v.smoke));
  if (v.repeats) config.repeats = Number(v.repeats);
  if (v.rounds) config.rounds = Number(v.rounds);
  if (v.concurrencies) config.concurrencies = v.concurrencies.split(",").map(Number);
  const [runtimes, phases] = [pick(load.RUNTIME_NAMES, v.runtimes), pick(PHASES, v.phases)];
  const product = v.product ? resolve(v.product) : load.PRODUCT;
  const dir = out ?? (v.smoke ? mkdtempSync(join(tmpdir(), "smtp521-bench-")) : undefined);
  const logs = join(dir ?? join(load.ROOT, "bench", "out"), "logs");
  mkdirSync(logs, { recursive: true });
  const before = { load: loadavg()[0], product: describeProduct(product) };
  const pinned = load.startClients(config.processes, !v["no-pin"]);
  if (!pinned && !v["no-pin"]) {
    progress("could not pin (taskset, 2 CPUs): servers and load share cores");
  }
  const raw: Omit<Raw, "context"> = { samples: [], lines: {}, small: {} };
  /** One server's figures in one repeat (or speed round), made on first use. */
  const sample = (runtime: Runtime, impl: Impl, repeat: number) => {
    const found = raw.samples.find((s) =>
      s.runtime === runtime && s.impl === impl && s.repeat === repeat
    );
    if (found) return found;
    const made: Sample = { runtime, impl, repeat, rates: {}, held: null, hostile: null };
    raw.samples.push(made);
    return made;
  };
  try {
    for (const runtime of runtimes) {
      const b = { runtime, config, product, logs };
      if (phases.includes("speed")) {
        await speedPhase(b, (impl, round) => sample(runtime, impl, round));
        progress(`${runtime}: speed done`);
      }
      for (let repeat = 0; repeat < config.repeats; repeat++) {
        // The bare responder first in one repeat, smtp521 first in the next.
        const order = repeat % 2 ? HELD.toReversed() : HELD;
        if (phases.includes("memory")) {
          for (const impl of order) sample(runtime, impl, repeat).held = await memoryPhase(b, impl);
        }
        if (phases.includes("hostile")) {
          sample(runtime, "smtp521", repeat).hostile = await hostilePhase(b);
        }
        if (phases.includes("memory") || phases.includes("hostile")) {
          progress(`${runtime}, repeat ${repeat + 1} of ${config.repeats}: done`);
        }
      }
      if (phases.includes("lines")) raw.lines[runtime] = await linesPhase(b);
      if (phases.includes("small")) raw.small[runtime] = await smallPhase(b);
      progress(`${runtime}: done`);
    }
  } finally {
    load.stopClients();
  }
  const productAfter = describeProduct(product);
  const version = (runtime: Runtime) => {
    const text = execFileSync(join(load.BIN, runtime), ["--version"], { timeout: 10_000 })
      .toString();
    return [runtime, /\d+\.\d+\.\d+/.exec(text)?.[0] ?? text.trim()];
  };
  const context: Raw["context"] = {
    smoke: Boolean(v.smoke),
    command: ["node bench/run.ts", ...args].join(" "),
    date: new Date().toISOString(),
    machine: load.machine(),
    versions: Object.fromEntries([...runtimes, "node" as const].map(version)),
    // Only the content counts: commits that leave smtp521.ts alone may land meanwhile.
    product: productAfter.endsWith(before.product.slice(-12))
      ? before.product
      : `CHANGED DURING THE RUN: ${before.product}, then ${productAfter}`,
    pinned,
    load: [before.load, loadavg()[0]],
    wallS: (Date.now() - begun) / 1000,
    runtimes,
    config,
  };
  writeFileSync(join(logs, "..", "results.json"), JSON.stringify({ context, ...raw }, null, 1));
  write(dir, { context, ...raw });
}

/** RESULTS.md from the raw figures, into `dir` or else bench/, as `deno fmt` writes it. */
function write(dir: string | undefined, raw: Raw): void {
  const file = join(dir ?? join(load.ROOT, "bench"), "RESULTS.md");
  const text = execFileSync(join(load.BIN, "deno"), ["fmt", "--ext", "md", "-"], {
    cwd: load.ROOT, // its deno.json: 100 columns
    input: markdown(raw),
    encoding: "utf8",
  });
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, text);
  process.stdout.write(text);
  progress(`wrote ${file}`);
}

if (import.meta.main) {
  main(process.argv.slice(2)).catch((error: Error) => {
    process.stderr.write(`bench: ${error.stack ?? error}\n`);
    process.exitCode = 1;
  });
}

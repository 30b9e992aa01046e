// From raw samples to figures, ratios, target verdicts and RESULTS.md. Pure
// functions of the samples, so the smoke test can check the same shapes the
// full run writes.

import type { Held, Hostile, Rate } from "./load.ts";
import type { Impl, Runtime } from "./proc.ts";

const MB = 1024 * 1024;
const KB = 1024;

/** One server on one runtime in one repeat. */
export interface Sample {
  runtime: Runtime;
  impl: Impl;
  repeat: number;
  /** By concurrency ("1", "16", "128"); the baseline also has "16@N+1" (one more client process). */
  rates: Record<string, Rate>;
  /** Null for the control and the floor, which run the rate phase only. */
  held: Held | null;
  hostile: Hostile | null;
}

/** Bytes of RSS per connection from the first to the second step of held connections. */
export function marginal(held: Held): number {
  const [first, second] = held.steps;
  return (second.rss - first.rss) / (second.held - first.held);
}

export interface Figure {
  readonly key: string;
  readonly label: string;
  get(sample: Sample): number | undefined;
}

/** Every figure the report shows, per server; undefined where a server has no such phase. */
export function figures(concurrencies: readonly number[], hold: number): Figure[] {
  const perConcurrency = (key: string, label: string, pick: (rate: Rate) => number) =>
    concurrencies.map((c): Figure => ({
      key: `${key}@${c}`,
      label: `${label}, ${c} clients`,
      get: (s) => s.rates[String(c)] && pick(s.rates[String(c)]),
    }));
  const hostile = (pick: (h: Hostile) => number) => (s: Sample) => s.hostile ? pick(s.hostile) : undefined;
  const held = (pick: (h: Held) => number) => (s: Sample) => s.held ? pick(s.held) : undefined;
  return [
    ...perConcurrency("rate", "sessions/s", (r) => r.sessionsPerS),
    ...perConcurrency("p50", "greeting p50 ms", (r) => r.p50),
    ...perConcurrency("p99", "greeting p99 ms", (r) => r.p99),
    // The server's own CPU per session: the cleanest cost figure when client and server share the cores.
    ...perConcurrency("cpu", "server CPU µs per session", (r) => (1e6 * r.serverCpu) / r.sessionsPerS),
    { key: "idle", label: "idle RSS MB (fresh process)", get: held((h) => h.idle / MB) },
    { key: "held", label: `RSS MB, ${hold} idle connections held`, get: held((h) => h.steps[0].rss / MB) },
    {
      key: "perConnAvg",
      label: `RSS per held connection KB, first ${hold} (with one-time costs)`,
      get: held((h) => (h.steps[0].rss - h.idle) / h.steps[0].held / KB),
    },
    {
      key: "perConn",
      label: `RSS per held connection KB, next ${hold} (marginal)`,
      get: held((h) => marginal(h) / KB),
    },
    { key: "hostileIdle", label: "hostile: RSS MB before", get: hostile((h) => h.idle / MB) },
    { key: "hostilePeak", label: "hostile: peak RSS MB", get: hostile((h) => h.peak / MB) },
    { key: "hostileGrowth", label: "hostile: peak - before, MB", get: hostile((h) => (h.peak - h.idle) / MB) },
  ];
}

export interface Spread {
  median: number;
  min: number;
  max: number;
  n: number;
}

export function spread(values: readonly number[]): Spread {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  return { median, min: sorted[0], max: sorted[sorted.length - 1], n: sorted.length };
}

/** A figure's values for one server, one per repeat, in repeat order. */
export function series(samples: readonly Sample[], runtime: Runtime, impl: Impl, figure: Figure): number[] {
  return samples
    .filter((s) => s.runtime === runtime && s.impl === impl)
    .sort((a, b) => a.repeat - b.repeat)
    .map(figure.get)
    .filter((v): v is number => v !== undefined);
}

/** Ratios `impl / against` repeat by repeat: the two ran back to back, so drift cancels. */
export function ratios(samples: readonly Sample[], runtime: Runtime, impl: Impl, against: Impl, figure: Figure) {
  const mine = series(samples, runtime, impl, figure);
  const theirs = series(samples, runtime, against, figure);
  return mine.slice(0, theirs.length).map((value, i) => value / theirs[i]);
}

type AtConcurrency = { c: number; ratio: number };

/** The median over the repeats of `impl / against` for a speed figure (`rate`, `p99`) at each concurrency. */
function medianRatios(
  samples: readonly Sample[],
  runtime: Runtime,
  impl: Impl,
  concurrencies: readonly number[],
  by: (key: string) => Figure,
  prefix: string,
  against: Impl = "baseline",
): AtConcurrency[] {
  return concurrencies.map((c) => ({
    c,
    ratio: spread(ratios(samples, runtime, impl, against, by(`${prefix}@${c}`))).median,
  }));
}

const list = (items: readonly AtConcurrency[]) => items.map((i) => `${fixed(i.ratio)}x@${i.c}`).join(", ");

export type Verdict = "PASS" | "MISS";

export interface Target {
  readonly runtime: Runtime;
  readonly name: string;
  readonly verdict: Verdict;
  /** The measured value the verdict rests on, as text. */
  readonly detail: string;
}

const fixed = (value: number, digits = 2) => value.toFixed(digits);

/** Issue 7's four targets, judged on medians over the repeats (every concurrency for the rate and latency). */
export function targets(samples: readonly Sample[], runtime: Runtime, concurrencies: readonly number[], hold: number) {
  const all = figures(concurrencies, hold);
  const by = (key: string) => all.find((f) => f.key === key)!;
  const rate = medianRatios(samples, runtime, "smtp521", concurrencies, by, "rate");
  const worstRate = rate.reduce((a, b) => (b.ratio < a.ratio ? b : a));
  const p99 = medianRatios(samples, runtime, "smtp521", concurrencies, by, "p99");
  const worstP99 = p99.reduce((a, b) => (b.ratio > a.ratio ? b : a));
  const perConn = (impl: Impl) => spread(series(samples, runtime, impl, by("perConn"))).median;
  const extra = perConn("smtp521") - perConn("baseline");
  const growth = spread(series(samples, runtime, "smtp521", by("hostileGrowth"))).median;
  const result: Target[] = [
    {
      runtime,
      name: "sessions/s >= 0.9x baseline",
      verdict: worstRate.ratio >= 0.9 ? "PASS" : "MISS",
      detail: list(rate),
    },
    {
      runtime,
      name: "p99 greeting <= 1.2x baseline",
      verdict: worstP99.ratio <= 1.2 ? "PASS" : "MISS",
      detail: list(p99),
    },
    {
      runtime,
      name: "RSS per held connection <= baseline + 1 KB",
      verdict: extra <= 1 ? "PASS" : "MISS",
      detail: `${fixed(perConn("smtp521"))} vs ${fixed(perConn("baseline"))} KB (${extra >= 0 ? "+" : ""}${
        fixed(extra)
      } KB)`,
    },
    {
      runtime,
      name: "hostile peak RSS <= idle + 15 MB",
      verdict: growth <= 15 ? "PASS" : "MISS",
      detail: `+${fixed(growth, 1)} MB`,
    },
  ];
  return result;
}

// ---------------------------------------------------------------------------
// Markdown
// ---------------------------------------------------------------------------

/** Enough digits to compare, not more. */
export function num(value: number): string {
  if (!Number.isFinite(value)) return String(value);
  const abs = Math.abs(value);
  return abs >= 100 ? value.toFixed(0) : abs >= 10 ? value.toFixed(1) : abs >= 1 ? value.toFixed(2) : value.toFixed(3);
}

const cell = (values: readonly number[]) => {
  if (!values.length) return "-";
  const s = spread(values);
  return s.n > 1 ? `${num(s.median)} (${num(s.min)}–${num(s.max)})` : num(s.median);
};

function table(head: readonly string[], rows: readonly (readonly string[])[]): string {
  const line = (cells: readonly string[]) => `| ${cells.join(" | ")} |`;
  return [line(head), line(head.map(() => "---")), ...rows.map(line)].join("\n");
}

export interface Context {
  readonly title: string;
  readonly generated: string;
  readonly machine: string;
  readonly versions: Record<string, string>;
  readonly product: string;
  readonly settings: string;
  readonly runtimes: readonly Runtime[];
  readonly concurrencies: readonly number[];
  readonly hold: number;
  readonly processes: number;
  readonly foreignMax: number;
  /** bench/HISTORY.md: what changed in smtp521 for the targets, measured before and after. */
  readonly history?: string;
}

/** The native bare responder each runtime has, if any. */
export const NATIVE: Partial<Record<Runtime, Impl>> = { deno: "deno-listen", bun: "bun-listen" };
const NATIVE_NAME: Partial<Record<Impl, string>> = { "deno-listen": "Deno.listen", "bun-listen": "Bun.listen" };

export function markdown(samples: readonly Sample[], context: Context): string {
  const { runtimes, concurrencies, hold } = context;
  const all = figures(concurrencies, hold);
  const judged = runtimes.flatMap((runtime) => targets(samples, runtime, concurrencies, hold));
  const parts = [
    `# ${context.title}`,
    context.generated,
    "## Machine and versions",
    [
      `- Machine: ${context.machine}`,
      ...Object.entries(context.versions).map(([what, version]) => `- ${what}: ${version}`),
      `- Product: ${context.product}`,
      `- Settings: ${context.settings}`,
    ].join("\n"),
    "## How to read these figures",
    readingNotes(context),
    "## Targets (smtp521 / baseline on the same runtime, medians over the repeats)",
    table(
      ["runtime", ...judged.filter((t) => t.runtime === runtimes[0]).map((t) => t.name)],
      runtimes.map((runtime) => [
        runtime,
        ...judged.filter((t) => t.runtime === runtime).map((t) => `**${t.verdict}** ${t.detail}`),
      ]),
    ),
    controlSummary(samples, context),
    floorSummary(samples, context),
    ...runtimes.flatMap((runtime) => [
      `## ${context.versions[runtime] ?? runtime}: smtp521 against the node:net baseline`,
      "Median (min–max) over the repeats; the ratio is taken repeat by repeat.",
      table(
        ["figure", "baseline", "smtp521", "smtp521 / baseline"],
        all.map((f) => [
          f.label,
          cell(series(samples, runtime, "baseline", f)),
          cell(series(samples, runtime, "smtp521", f)),
          cell(ratios(samples, runtime, "smtp521", "baseline", f)),
        ]),
      ),
    ]),
    "## The baseline against itself: how far a ratio moves when nothing differs",
    controlCheck(samples, context),
    "## The floor: what SPEC's per-session work costs, and smtp521's own cost beyond it",
    floorCheck(samples, context),
    "## Is the load generator the bottleneck?",
    loadCheck(samples, context),
    "## Native listeners: Deno.listen and Bun.listen against node:net (bare responders, same runtime)",
    nativeCheck(samples, context),
    ...(context.history
      ? ["## Before and after: what changed in smtp521 for the targets", context.history.trim()]
      : []),
  ];
  return parts.join("\n\n") + "\n";
}

/** What the figures mean on this kind of machine; fixed text, true of every run. */
function readingNotes(context: Context): string {
  return [
    `- The server, the ${context.processes} client processes and the kernel's loopback TCP work share the machine's ` +
    "cores. sessions/s is what a server reaches while competing with its own load for them; both servers face the " +
    "same competition, so the ratio is fair, but it understates the difference between the servers. " +
    "\"server CPU µs per session\" (all the server's threads, from /proc) is each server's own cost.",
    "- Greeting latency runs from the client's connect() to the whole greeting line. Its p99 here is mostly CPU " +
    "scheduling between server and clients: a server that spends more CPU per session has the longer tail.",
    `- Memory per held connection is the marginal cost, from ${context.hold} to ${2 * context.hold} held on a fresh ` +
    `process; the first ${context.hold} also pay one-time costs (code, the young generation growing), shown apart.`,
    "- The hostile load starts from a warmed-up server: its RSS before is idle after a second of sessions, as in " +
    "production. smtp521 closes the slowloris clients after its --timeout and the long line at 1000 octets; the bare " +
    "baseline keeps both until the client gives up, and reads the whole line.",
  ].join("\n");
}

/** Baseline at 16 clients with N and N+1 client processes, and the CPU of each side. */
function loadCheck(samples: readonly Sample[], context: Context): string {
  const { runtimes, processes } = context;
  const of = (runtime: Runtime, key: string) =>
    samples.filter((s) => s.runtime === runtime && s.impl === "baseline" && s.rates[key]).map((s) => s.rates[key]);
  const cpuCell = (rates: Rate[], pick: (r: Rate) => number) => cell(rates.map((r) => 100 * pick(r)));
  const foreign = samples.flatMap((s) => Object.values(s.rates).map((r) => 100 * r.foreign));
  return [
    `Baseline sessions/s at 16 clients spread over ${processes} and ${
      processes + 1
    } client processes, and CPU in % of one core ` +
    "(client: the busiest client process; server: all its threads, from /proc/PID/stat).",
    table(
      [
        "runtime",
        `${processes} processes`,
        `${processes + 1} processes`,
        "change",
        `client CPU, ${processes} processes`,
        `client CPU, ${processes + 1} processes`,
        "server CPU",
      ],
      runtimes.map((runtime) => {
        const n = of(runtime, "16");
        const n1 = of(runtime, "16@N+1");
        const change = n1.map((r, i) => 100 * (r.sessionsPerS / n[i].sessionsPerS - 1));
        return [
          runtime,
          cell(n.map((r) => r.sessionsPerS)),
          cell(n1.map((r) => r.sessionsPerS)),
          n1.length ? `${cell(change)} %` : "-",
          cpuCell(n, (r) => Math.max(...r.clientCpu)),
          cpuCell(n1, (r) => Math.max(...r.clientCpu)),
          cpuCell(n, (r) => r.serverCpu),
        ];
      }),
    ),
    `Other programs' CPU during the rate windows (the machine may be shared; a window over ` +
    `${context.foreignMax * 100} % of a core is measured again): median ${num(spread(foreign).median)} %, ` +
    `max ${num(spread(foreign).max)} % of a core.`,
  ].join("\n\n");
}

/** The speed figures that can be told apart from noise only by the control. */
const SPEED = /^(rate|p50|p99|cpu)@/;

/** The runtimes this run measured `impl` on. */
const measuredOn = (samples: readonly Sample[], runtimes: readonly Runtime[], impl: Impl) =>
  runtimes.filter((runtime) => samples.some((s) => s.runtime === runtime && s.impl === impl));

/** The control's ratios in the targets' terms, under the targets table. */
function controlSummary(samples: readonly Sample[], context: Context): string {
  const { runtimes, concurrencies, hold } = context;
  const all = figures(concurrencies, hold);
  const by = (key: string) => all.find((f) => f.key === key)!;
  const measured = measuredOn(samples, runtimes, "control");
  if (!measured.length) return "The control (the baseline against itself) was not run.";
  return [
    "The same ratios for the control, a second process of the baseline's own file run between the same servers: " +
    'what this run gives when nothing differs (section "The baseline against itself").',
    table(
      ["runtime", "sessions/s, control / baseline", "p99 greeting, control / baseline"],
      measured.map((runtime) => [
        runtime,
        list(medianRatios(samples, runtime, "control", concurrencies, by, "rate")),
        list(medianRatios(samples, runtime, "control", concurrencies, by, "p99")),
      ]),
    ),
  ].join("\n\n");
}

/** A row per speed figure on each runtime that ran `impl`: the runtime, the figure, then `cells`. */
function speedRows(
  samples: readonly Sample[],
  context: Context,
  impl: Impl,
  cells: (runtime: Runtime, figure: Figure) => string[],
): string[][] {
  const speed = figures(context.concurrencies, context.hold).filter((f) => SPEED.test(f.key));
  return measuredOn(samples, context.runtimes, impl).flatMap((runtime) =>
    speed.map((f) => [runtime, f.label, ...cells(runtime, f)])
  );
}

/** Every speed figure of the control against the baseline, repeat by repeat. */
function controlCheck(samples: readonly Sample[], context: Context): string {
  const rows = speedRows(samples, context, "control", (runtime, f) => [
    cell(series(samples, runtime, "baseline", f)),
    cell(series(samples, runtime, "control", f)),
    cell(ratios(samples, runtime, "control", "baseline", f)),
    cell(ratios(samples, runtime, "smtp521", "baseline", f)),
  ]);
  return [
    "The control is bench/baseline.ts again, started as a server of its own and measured exactly as the baseline " +
    "and smtp521 are. Its ratio to the baseline is 1 but for noise: the spread of its ratios is how far a ratio of " +
    "this run moves between two runs of one file. A ratio of smtp521's that lies within it is not a difference the " +
    "run can show.",
    table(["runtime", "figure", "baseline", "control", "control / baseline", "smtp521 / baseline"], rows),
  ].join("\n\n");
}

/** The floor against the baseline and smtp521 against the floor, in the targets' terms, under the targets table. */
function floorSummary(samples: readonly Sample[], context: Context): string {
  const { runtimes, concurrencies, hold } = context;
  const all = figures(concurrencies, hold);
  const by = (key: string) => all.find((f) => f.key === key)!;
  const measured = measuredOn(samples, runtimes, "floor");
  if (!measured.length) return "The floor (the baseline plus SPEC's per-session work) was not run.";
  return [
    "The floor is the baseline plus the least SPEC asks of every session: the client's address read once (SPEC §4, " +
    '§6) and one session line logged (SPEC §6) (section "The floor"). smtp521 / baseline splits into ' +
    "floor / baseline, what SPEC asks, and smtp521 / floor, what smtp521's own code adds:",
    table(
      [
        "runtime",
        "sessions/s, floor / baseline",
        "sessions/s, smtp521 / floor",
        "p99 greeting, floor / baseline",
        "p99 greeting, smtp521 / floor",
      ],
      measured.map((runtime) => [
        runtime,
        list(medianRatios(samples, runtime, "floor", concurrencies, by, "rate")),
        list(medianRatios(samples, runtime, "smtp521", concurrencies, by, "rate", "floor")),
        list(medianRatios(samples, runtime, "floor", concurrencies, by, "p99")),
        list(medianRatios(samples, runtime, "smtp521", concurrencies, by, "p99", "floor")),
      ]),
    ),
  ].join("\n\n");
}

/** Every speed figure of the floor against the baseline, and of smtp521 against the floor, repeat by repeat. */
function floorCheck(samples: readonly Sample[], context: Context): string {
  const rows = speedRows(samples, context, "floor", (runtime, f) => [
    cell(series(samples, runtime, "baseline", f)),
    cell(series(samples, runtime, "floor", f)),
    cell(series(samples, runtime, "smtp521", f)),
    cell(ratios(samples, runtime, "floor", "baseline", f)),
    cell(ratios(samples, runtime, "smtp521", "floor", f)),
  ]);
  return [
    "bench/floor.ts is bench/baseline.ts plus what SPEC asks of every session and nothing else: it reads the " +
    "client's address and port once per connection (the per-address limit of SPEC §4 and the `remote=` of SPEC §6 " +
    "need them) and logs one session line per connection to stderr (SPEC §6), 50 ms of lines per write, as smtp521 " +
    "does. It has no limits, time-outs, session core or lingering. floor / baseline is the cost of that work, which " +
    "the targets count against smtp521; smtp521 / floor is the cost of everything else smtp521 does. The targets " +
    "themselves stay against the bare baseline.",
    table(
      ["runtime", "figure", "baseline", "floor", "smtp521", "floor / baseline", "smtp521 / floor"],
      rows,
    ),
  ].join("\n\n");
}

/** Deno.listen / Bun.listen over node:net on the same runtime; "better" means by 20 % or more. */
function nativeCheck(samples: readonly Sample[], context: Context): string {
  const all = figures(context.concurrencies, context.hold);
  const wanted = all.filter((f) => /^(rate@|p99@|cpu@|idle|held|perConn)/.test(f.key));
  const rows = context.runtimes.flatMap((runtime) => {
    const native = NATIVE[runtime];
    if (!native || !samples.some((s) => s.runtime === runtime && s.impl === native)) return [];
    return wanted.map((f) => {
      const r = spread(ratios(samples, runtime, native, "baseline", f)).median;
      const better = f.key.startsWith("rate@") ? r >= 1.2 : r <= 1 / 1.2;
      return [
        `${runtime}: ${NATIVE_NAME[native]}`,
        f.label,
        cell(series(samples, runtime, "baseline", f)),
        cell(series(samples, runtime, native, f)),
        cell(ratios(samples, runtime, native, "baseline", f)),
        `${better ? "yes" : "no"} (${r.toFixed(3)})`,
      ];
    });
  });
  return [
    "Better means sessions/s ≥ 1.2x node:net, or latency / memory ≤ 1/1.2 of node:net.",
    table(["server", "figure", "node:net", "native", "native / node:net", "20 % better?"], rows),
  ].join("\n\n");
}

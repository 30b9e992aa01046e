// From raw samples to figures, ratios, verdicts and RESULTS.md: pure functions
// of the samples, so the smoke test checks the same figures the full run
// writes. What the figures mean is in bench/README.md, not here.

import type { Held, Hostile, Impl, Rate, Runtime } from "./load.ts";
import type { Config } from "./run.ts";

const MB = 1024 * 1024;
const KB = 1024;

/** One server on one runtime in one repeat; phases it did not run stay empty. */
export interface Sample {
  runtime: Runtime;
  impl: Impl;
  repeat: number;
  rates: Record<string, Rate>;
  held: Held | null;
  hostile: Hostile | null;
}

/** One adversarial shape: server CPU µs per session, one value per round. */
export interface Line {
  name: string;
  octets: number;
  cpu: number[];
}

/** One runtime flag variant on a small host. */
export interface Small {
  flags: string[];
  startMs: number[];
  idle: number;
  served: number;
  held: number;
  rate: Rate;
}

export interface Context {
  smoke: boolean;
  command: string;
  date: string;
  machine: string;
  versions: Record<string, string>;
  product: string;
  pinned: boolean;
  load: [number, number];
  wallS: number;
  runtimes: readonly Runtime[];
  config: Config;
}

export interface Figure {
  readonly label: string;
  get(sample: Sample): number | undefined;
}

/** Every figure per server; undefined where a server has no such phase. */
export function figures(concurrencies: readonly number[], hold: number): Figure[] {
  const rate = (label: string, pick: (rate: Rate) => number) =>
    concurrencies.map((c): Figure => ({
      label: `${label}, ${c} clients`,
      get: (s) => s.rates[c] && pick(s.rates[c]),
    }));
  const held = (label: string, pick: (h: Held) => number): Figure => ({
    label,
    get: (s) => s.held ? pick(s.held) : undefined,
  });
  const hostile = (label: string, pick: (h: Hostile) => number): Figure => ({
    label,
    get: (s) => s.hostile ? pick(s.hostile) : undefined,
  });
  return [
    ...rate("server CPU µs per session", (r) => (1e6 * r.serverCpu) / r.sessionsPerS),
    ...rate("sessions/s", (r) => r.sessionsPerS),
    ...rate("greeting p50 ms", (r) => r.p50),
    ...rate("greeting p99 ms", (r) => r.p99),
    ...rate("load generator CPU, cores", (r) => r.clientCpu),
    held("idle RSS MB (fresh process)", (h) => h.idle / MB),
    held(`RSS MB, ${hold} idle connections held`, (h) => h.steps[0].rss / MB),
    held(
      `RSS per held connection KB, first ${hold}`,
      (h) => (h.steps[0].rss - h.idle) / h.steps[0].held / KB,
    ),
    held(`RSS per held connection KB, next ${hold} (marginal)`, (h) => marginal(h) / KB),
    hostile("hostile: RSS MB before", (h) => h.idle / MB),
    hostile("hostile: peak - before, MB", (h) => (h.peak - h.idle) / MB),
  ];
}

export function marginal(held: Held): number {
  const [first, second] = held.steps;
  return (second.rss - first.rss) / (second.held - first.held);
}

export const median = (values: readonly number[]) => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
};

/** A figure's values for one server, in repeat order. */
function series(samples: readonly Sample[], runtime: Runtime, impl: Impl, figure: Figure) {
  const mine = samples.filter((s) => s.runtime === runtime && s.impl === impl);
  return mine.sort((a, b) => a.repeat - b.repeat).map(figure.get).filter((v) => v !== undefined);
}

/** `impl / against` repeat by repeat: the two ran back to back, so drift cancels. */
function ratios(samples: readonly Sample[], runtime: Runtime, impl: Impl, figure: Figure) {
  const theirs = series(samples, runtime, "floor", figure);
  return series(samples, runtime, impl, figure).slice(0, theirs.length).map((v, i) =>
    v / theirs[i]
  );
}

/** Enough digits to compare, not more. */
export const num = (value: number) =>
  value.toFixed(
    Math.min(3, Math.max(0, 2 - Math.floor(Math.log10(Math.max(Math.abs(value), 1e-3))))),
  );

const cell = (values: readonly number[]) =>
  !values.length
    ? "-"
    : values.length > 1
    ? `${num(median(values))} (${num(Math.min(...values))}–${num(Math.max(...values))})`
    : num(values[0]);
const x = (ratio: number) => `${ratio.toFixed(2)}x`;
const row = (cells: readonly string[]) => `| ${cells.join(" | ")} |`;
const table = (head: readonly string[], rows: readonly (readonly string[])[]) =>
  [row(head), row(head.map(() => "---")), ...rows.map(row)].join("\n");

/** The speed of smtp521 and of the control against the floor, at each concurrency; the verdict is on CPU. */
function speed(samples: readonly Sample[], runtime: Runtime, all: Figure[], c: number) {
  const by = (label: string) => all.find((f) => f.label === `${label}, ${c} clients`)!;
  const pair = (label: string) => {
    const mine = median(ratios(samples, runtime, "smtp521", by(label)));
    const control = ratios(samples, runtime, "control", by(label));
    const [low, high] = [Math.min(1, ...control), Math.max(1, ...control)];
    const reading = mine >= low && mine <= high ? "within noise" : mine > high ? "higher" : "lower";
    return { mine, reading, text: `${x(mine)} (control ${low.toFixed(2)}–${high.toFixed(2)})` };
  };
  const [cpu, rate, p99] = ["server CPU µs per session", "sessions/s", "greeting p99 ms"].map(pair);
  return { cpu, rate, p99 };
}

/** The worst adversarial shape against each NOOP, on medians over the rounds. */
function worstLine(lines: readonly Line[]) {
  const [short, long, ...shapes] = lines.map((l) => ({ ...l, cpu: median(l.cpu) }));
  const worst = shapes.reduce((a, b) => (b.cpu > a.cpu ? b : a));
  return { worst, long: worst.cpu / long.cpu, short: worst.cpu / short.cpu };
}

export function markdown(
  samples: readonly Sample[],
  lines: Partial<Record<Runtime, Line[]>>,
  small: Partial<Record<Runtime, Small[]>>,
  context: Context,
): string {
  const { config, runtimes } = context;
  const all = figures(config.concurrencies, config.hold);
  const has = (runtime: Runtime, impl: Impl, figure: Figure) =>
    series(samples, runtime, impl, figure).length > 0;
  const c = config;
  const out: string[] = [
    `# smtp521 benchmark results${context.smoke ? " (SMOKE RUN: tiny counts, meaningless)" : ""}`,
    [
      `\`${context.command}\` (\`npm run bench\`), ${context.date}, ${
        (context.wallS / 60).toFixed(1)
      }`,
      `min; load average (1 min) ${context.load[0].toFixed(2)} before, ${
        context.load[1].toFixed(2)
      }`,
      "after. What each server and figure is: [README.md](README.md); how the bench came to be and",
      "what was changed for the targets: [HISTORY.md](HISTORY.md).",
    ].join(" "),
    [
      `- Machine: ${context.machine}`,
      `\n- Runtimes: ${
        runtimes.map((r) => `${r} ${context.versions[r]}`).join(", ")
      }; load generator:`,
      `bench/client.ts on Node ${context.versions.node}, ${c.processes} processes;`,
      context.pinned
        ? "pinned to CPU 0, servers to CPU 1"
        : "NOT PINNED: servers and load share cores",
      `\n- Product: ${context.product}`,
      `\n- Settings: ${c.repeats} repeats; speed: ${c.rateWarmMs / 1000} s warm-up, then at`,
      `${c.concurrencies.join(", ")} clients ${c.warmMs / 1000} s unmeasured, ${c.rateMs / 1000} s`,
      `measured; memory: ${c.hold} then ${
        2 * c.hold
      } idle connections on a fresh process; hostile:`,
      `${c.slowloris} slowloris + a ${
        c.lineBytes / MB
      } MB line, \`--timeout ${c.timeoutS}\`; lines:`,
      `${c.lineRounds} rounds of ${c.lineWindowMs / 1000} s per shape at 4 clients; small hosts:`,
      `${c.starts} starts, ${c.smallHold} connections held`,
    ].join(" "),
  ];

  const targetRows = runtimes.map((runtime) => {
    const cpu = config.concurrencies.map((c) => ({ c, ...speed(samples, runtime, all, c).cpu }));
    const perConn = (impl: Impl) =>
      median(series(samples, runtime, impl, all.find((f) => f.label.includes("marginal"))!));
    const extra = perConn("smtp521") - perConn("baseline");
    const growth = median(series(samples, runtime, "smtp521", all.at(-1)!));
    const line = lines[runtime] && worstLine(lines[runtime]!);
    const v = {
      cpu: cpu.every((r) => Number.isFinite(r.mine)) ? cpu.every((r) => r.mine <= 1.1) : null,
      perConn: Number.isFinite(extra) ? extra <= 2 : null,
      hostile: Number.isFinite(growth) ? growth <= 15 : null,
      lines: line ? line.long <= 2 : null,
    };
    const judged = (pass: boolean | null, text: string) =>
      pass === null ? "-" : `${pass ? "**PASS**" : "**MISS**"} ${text}`;
    return [
      runtime,
      judged(v.cpu, cpu.map((r) => `${x(r.mine)}@${r.c}`).join(", ")),
      judged(
        v.perConn,
        `${num(perConn("smtp521"))} vs ${num(perConn("baseline"))} KB (${extra >= 0 ? "+" : ""}${
          num(extra)
        })`,
      ),
      judged(v.hostile, `+${num(growth)} MB`),
      judged(
        v.lines,
        line ? `${x(line.long)} (${x(line.short)} the 4-octet NOOP; ${line.worst.name})` : "",
      ),
    ];
  });
  out.push(
    "## Targets",
    table(
      [
        "runtime|server CPU per session, smtp521 / floor <= 1.10x|RSS per held connection <= bare",
        "+ 2 KB|hostile peak <= idle + 15 MB|worst 1000-octet line / 1000-octet NOOP <= 2x",
      ].join(" ").split("|"),
      targetRows,
    ),
    "Beside the target, smtp521 / floor (median over the repeats) and, in brackets, the range of control / floor " +
      '(with 1): a ratio inside it reads "within noise", outside it "higher" or "lower" than the control.',
    table(
      "runtime|clients|server CPU per session|sessions/s|reading|greeting p99|reading".split("|"),
      runtimes.flatMap((runtime) =>
        config.concurrencies.map((c) => {
          const s = speed(samples, runtime, all, c);
          return [
            runtime,
            String(c),
            s.cpu.text,
            s.rate.text,
            s.rate.reading,
            s.p99.text,
            s.p99.reading,
          ];
        })
      ),
    ),
  );

  for (const runtime of runtimes) {
    const impls = (["floor", "smtp521", "control", "baseline"] as const).filter((impl) =>
      all.some((f) => has(runtime, impl, f))
    );
    out.push(
      `## ${runtime} ${context.versions[runtime]}: median (min–max) over the repeats`,
      table(
        ["figure", ...impls],
        all.filter((f) => impls.some((impl) => has(runtime, impl, f))).map((f) => [
          f.label,
          ...impls.map((impl) => cell(series(samples, runtime, impl, f))),
        ]),
      ),
    );
  }

  const lineRuntimes = runtimes.filter((r) => lines[r]);
  if (lineRuntimes.length) {
    out.push(
      "## Adversarial lines (rcpt mode): server CPU µs per session of 100 such lines, and / each NOOP",
      table(
        ["line", "octets", ...lineRuntimes],
        lines[lineRuntimes[0]]!.map((line, i) => [
          line.name.replaceAll("|", "\\|"),
          String(line.octets),
          ...lineRuntimes.map((r) => {
            const [short, long] = lines[r]!.map((l) => median(l.cpu));
            const mine = median(lines[r]![i].cpu);
            return `${num(mine)} (${x(mine / long)}, ${x(mine / short)})`;
          }),
        ]),
      ),
    );
  }

  const smallRuntimes = runtimes.filter((r) => small[r]);
  if (smallRuntimes.length) {
    out.push(
      "## Small hosts: smtp521 with runtime flags",
      table(
        `runtime|flags|start-up ms|idle RSS MB|RSS MB after 16 clients|RSS MB, ${config.smallHold} held|CPU µs per session|failed`
          .split("|"),
        smallRuntimes.flatMap((runtime) =>
          small[runtime]!.map((v) => [
            runtime,
            v.flags.length ? `\`${v.flags.join(" ")}\`` : "(none)",
            cell(v.startMs),
            ...[v.idle, v.served, v.held].map((bytes) => num(bytes / MB)),
            num((1e6 * v.rate.serverCpu) / v.rate.sessionsPerS),
            String(v.rate.failures),
          ])
        ),
      ),
    );
  }
  return out.join("\n\n") + "\n";
}

import { configDefaults, defineConfig } from "vitest/config";

// Two groups of test files, run one after the other (`npm test` runs both):
//
// - "parallel": the files that do not measure the machine (the session core and its
//   properties, the real file on three runtimes, operations, the probe). Their tests
//   mostly wait on the processes they spawn, so three files run at once on two cores;
//   every wait in them is for an event, with a bound far above what a busy machine needs.
// - "serial": the files that measure the machine (memory, CPU, descriptors, time-outs
//   under hostile load). Vitest runs a project without file parallelism after the
//   others, one file at a time, so nothing else runs beside them.
//
// The benchmark's smoke test proves the harness, not the product: it is not part of
// `npm test`; `npm run test:bench` (in .ci/run) runs it alone.
const SERIAL = ["test/stress.test.ts", "test/hostile.test.ts", "test/hardening.test.ts"];
const BENCH = ["test/bench.test.ts"];
const timeouts = { testTimeout: 30_000, hookTimeout: 30_000 };

export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: "parallel",
          include: ["*.test.ts", "test/*.test.ts"],
          exclude: [...configDefaults.exclude, ...SERIAL, ...BENCH],
          maxWorkers: 3,
          ...timeouts,
        },
      },
      { test: { name: "serial", include: SERIAL, fileParallelism: false, ...timeouts } },
      ...(process.env.SMTP521_BENCH_SMOKE ? [{ test: { name: "bench", include: BENCH, ...timeouts } }] : []),
    ],
  },
});

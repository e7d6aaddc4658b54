#!/usr/bin/env -S node --max-semi-space-size=1 --optimize-for-size --v8-pool-size=2
// Node flags for a small, steady daemon, each measured with `bench --rss` (250 pods,
// 1000 cached tokens; js throughput unchanged within the noise of a shared machine):
//   --max-semi-space-size=1  V8's young generation stays at 2 MiB instead of growing
//                            to 32 MiB: ~20 MiB less RSS;
//   --optimize-for-size      V8 favours memory over speed (heap growth, code flushing): ~7 MiB;
//   --v8-pool-size=2         two GC/compiler threads, not four, each with its own malloc
//                            arena: ~3.5 MiB.
// The bench starts nmi with this line's flags, as it runs when deployed.
import { main } from '../dist/src/cli/main.js';

process.exitCode = await main(process.argv.slice(2));

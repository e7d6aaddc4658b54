#!/usr/bin/env -S node --max-semi-space-size=1 --optimize-for-size --v8-pool-size=2 --no-memory-reducer
// Node flags for a small, steady daemon, each measured with `bench --rss` (250 pods,
// 1000 cached tokens; js throughput unchanged within the noise of a shared machine):
//   --max-semi-space-size=1  V8's young generation stays at 2 MiB instead of growing
//                            to 32 MiB: ~20 MiB less RSS;
//   --optimize-for-size      V8 favours memory over speed (heap growth, code flushing): ~7 MiB;
//   --v8-pool-size=2         two GC/compiler threads, not four, each with its own malloc
//                            arena: ~3.5 MiB;
//   --no-memory-reducer      no full GC when the heap goes quiet after start: that ~20 ms
//                            pause (with its helper threads) stalled the native server
//                            thread on a shared core, the fast path's p99 in `bench`
//                            1.1-2.0 ms -> 0.5-0.95 ms; RSS unchanged in `bench --rss`.
// The bench starts nmi with this line's flags, as it runs when deployed.
import { main } from '../dist/src/cli/main.js';

process.exitCode = await main(process.argv.slice(2));

#!/usr/bin/env -S node --max-semi-space-size=1
// --max-semi-space-size=1 (MiB): V8's young generation stays at 2 MiB instead of
// growing to 32 MiB, which nmi's small, steady allocation never needs: about
// 20-40 MiB less RSS in `bench --rss`, js throughput within the noise. The bench
// starts nmi with this line's flags, as it runs when deployed.
import { main } from '../dist/src/cli/main.js';

process.exitCode = await main(process.argv.slice(2));

#!/usr/bin/env node
// `nmi run` re-executes itself with the node flags of its server (src/lifecycle/node-flags.ts).
import { main } from '../dist/src/cli/main.js';

process.exitCode = await main(process.argv.slice(2));

// rawGet as a command, for requests that must come from inside a pod namespace
// (`ip netns exec <pod> node dist/bench/raw-get.js ...`): prints the answer's
// bytes as base64 on stdout.
//
//   node dist/bench/raw-get.js <host> <port> <target> [close]
import { rawGet } from './raw.js';

const [host, port, target, close] = process.argv.slice(2);
if (!host || !port || !target) {
  process.stderr.write('usage: node dist/bench/raw-get.js <host> <port> <target> [close]\n');
  process.exitCode = 2;
} else {
  try {
    process.stdout.write(`${(await rawGet({ host, port: Number(port), target, close: close === 'close' })).toString('base64')}\n`);
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`);
    process.exitCode = 1;
  }
}

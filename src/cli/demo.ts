// `nmi demo`: see src/demo/.
import { runDemo } from '../demo/demo.js';

export async function demo(): Promise<number> {
  return runDemo();
}

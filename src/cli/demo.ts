// `nmi demo`: filled in by the demo work; until then it says so.
import { NmiError, codes } from '../errors/errors.js';

export async function demo(): Promise<number> {
  throw new NmiError(codes.COMMAND_FAILED, 'demo: not built yet');
}

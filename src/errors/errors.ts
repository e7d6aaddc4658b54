// Every error nmi raises carries a stable `code`; callers and tests match on it. The README's
// "Error codes" says what each means and what to do (test/errors/codes.test.ts keeps them in step).
export const codes = {
  USAGE: 'NMI_ERR_USAGE',
  RULES_APPLY: 'NMI_ERR_RULES_APPLY',
  NATIVE_LOAD: 'NMI_ERR_NATIVE_LOAD',
  NATIVE_CALL: 'NMI_ERR_NATIVE_CALL',
  COMMAND_FAILED: 'NMI_ERR_COMMAND_FAILED',
  KUBELET: 'NMI_ERR_KUBELET',
  BINDINGS: 'NMI_ERR_BINDINGS',
  API_SERVER: 'NMI_ERR_API_SERVER',
  UPSTREAM: 'NMI_ERR_UPSTREAM',
  TOKEN: 'NMI_ERR_TOKEN',
  NETNS: 'NMI_ERR_NETNS',
  LISTEN: 'NMI_ERR_LISTEN',
  BUDGET: 'NMI_ERR_BUDGET',
} as const;

export type ErrorCode = (typeof codes)[keyof typeof codes];

export class NmiError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'NmiError';
    this.code = code;
  }
}

/** Bad flags or configuration: the CLI prints the one line and exits 2. */
export class UsageError extends NmiError {
  constructor(message: string) {
    super(codes.USAGE, message);
    this.name = 'UsageError';
  }
}

export function isNmiError(err: unknown, code?: ErrorCode): err is NmiError {
  return err instanceof NmiError && (code === undefined || err.code === code);
}

/** What to print or log of anything caught: an Error's message, else the value as text. */
export function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** A caught error as a log line's `err`: its stable code when it has one, and its message. */
export function errorSummary(err: unknown): { code?: unknown; message: string } {
  return { code: err instanceof Error ? (err as { code?: unknown }).code : undefined, message: messageOf(err) };
}

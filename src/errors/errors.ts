// Every error nmi raises carries a stable `code`; callers and tests match on it.
export const codes = {
  USAGE: 'NMI_ERR_USAGE',
  RULES_APPLY: 'NMI_ERR_RULES_APPLY',
  RULES_BACKEND_MISSING: 'NMI_ERR_RULES_BACKEND_MISSING',
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

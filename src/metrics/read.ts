// Reading the daemon's /metrics text back: `nmi status`, the demo and the tests.

/** A sample's value; `name` is a regex source and may pin labels: `'x\\{a="b"\\}'` in TypeScript. */
export function readMetric(text: string, name: string): number | undefined {
  const m = new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, 'm').exec(text);
  return m ? Number(m[1]) : undefined;
}

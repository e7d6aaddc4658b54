// /readyz is 200 only when every named condition holds; each concern adds its own.
export class Readiness {
  private readonly conditions = new Map<string, boolean>();

  require(name: string): void {
    if (!this.conditions.has(name)) this.conditions.set(name, false);
  }

  set(name: string, ready: boolean): void {
    this.conditions.set(name, ready);
  }

  get ready(): boolean {
    return [...this.conditions.values()].every(Boolean);
  }

  pending(): string[] {
    return [...this.conditions].filter(([, ok]) => !ok).map(([name]) => name);
  }
}

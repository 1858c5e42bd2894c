// One stack of releases for everything a node acquires: each step of a start pushes the release of what it
// just acquired, and a stop (or a step that fails) runs them newest first. So a failure at any step releases
// exactly what was acquired before it, and a stop releases everything, through the same code.

export interface Release {
  /** What it releases, for the log when a release fails. */
  readonly name: string;
  readonly run: () => void | Promise<void>;
}

export class DisposalStack {
  private readonly releases: Release[] = [];
  private disposing: Promise<void> | null = null;

  constructor(private readonly onError: (name: string, err: unknown) => void = () => {}) {}

  /** Pushes a release. After dispose() began, it runs at once (nothing may outlive the stack). */
  defer(name: string, run: () => void | Promise<void>): void {
    if (this.disposing !== null) {
      void this.runOne({ name, run });
      return;
    }
    this.releases.push({ name, run });
  }

  /** Acquires with `acquire` and pushes `release` for what it got; a failed acquisition pushes nothing. */
  async use<T>(name: string, acquire: () => Promise<T> | T, release: (value: T) => void | Promise<void>): Promise<T> {
    const value = await acquire();
    this.defer(name, () => release(value));
    return value;
  }

  /** What is still held, oldest first (tests, logs). */
  held(): readonly string[] {
    return this.releases.map((r) => r.name);
  }

  /** Runs every release newest first, each once, each even when an earlier one failed. Idempotent. */
  dispose(): Promise<void> {
    return (this.disposing ??= (async () => {
      for (let r = this.releases.pop(); r !== undefined; r = this.releases.pop()) await this.runOne(r);
    })());
  }

  private async runOne(r: Release): Promise<void> {
    try {
      await r.run();
    } catch (err) {
      this.onError(r.name, err);
    }
  }
}

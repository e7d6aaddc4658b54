// cgroup id → pod UID, from the folder names the kubelet gives pod cgroups
// under --cgroup-root. A cgroup v2 folder's inode number is the id that
// bpf_get_current_cgroup_id() reports, so one walk of the tree maps every
// container's cgroup to its pod. Unknown ids trigger a walk, at most one per
// minWalkGapMs (a caller cannot make nmi walk the tree in a loop); within the
// gap they wait for the walk at its end, so a new container is late, not refused.
import { opendir, stat } from 'node:fs/promises';
import path from 'node:path';
import { SpacedRefresh } from '../util/spaced-refresh.js';

const UID = '[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}';
/** systemd driver: kubepods-burstable-pod<uid with _>.slice; cgroupfs driver: pod<uid>. */
const podFolder = new RegExp(`^(?:[a-z0-9_-]*-)?pod(${UID})(?:\\.slice)?$`, 'i');

/** The UID of the pod whose cgroup holds this folder (relative to the cgroup root), or undefined. */
export function podUidFromPath(folder: string): string | undefined {
  const segments = folder.split('/');
  for (let i = segments.length - 1; i >= 0; i--) {
    const match = podFolder.exec(segments[i] ?? '');
    if (match?.[1]) return match[1].replaceAll('_', '-').toLowerCase();
  }
  return undefined;
}

/** Deep enough for kubepods.slice/<qos>.slice/<pod>.slice/<container>.scope/<nested>; pods never go deeper. */
const MAX_DEPTH = 6;

export class CgroupPods {
  /** cgroup id → pod UID, or null for a cgroup under the root that belongs to no pod. */
  private byId = new Map<bigint, string | null>();
  private byUid = new Map<string, bigint[]>();
  private walking: Promise<void> | undefined;
  private readonly spaced: SpacedRefresh;
  walks = 0;

  constructor(
    private readonly root: string,
    private readonly options: { minWalkGapMs?: number; onWalk?: () => void } = {},
  ) {
    this.spaced = new SpacedRefresh(options.minWalkGapMs ?? 1_000, () => this.walk());
  }

  /** Every cgroup of the pod with this UID, as of the last walk. */
  idsOf(uid: string): readonly bigint[] {
    return this.byUid.get(uid) ?? [];
  }

  /** From the last walk only: undefined when this id was not seen. */
  known(id: bigint): string | null | undefined {
    return this.byId.get(id);
  }

  /** The pod UID of a cgroup, walking the tree again if the id is new; null when it is no pod's, undefined when no walk found it. */
  async uidOf(id: bigint): Promise<string | null | undefined> {
    const known = this.byId.get(id);
    if (known !== undefined) return known;
    await (this.walking ?? this.spaced.request());
    return this.byId.get(id);
  }

  /** Joins the walk in flight, or makes one now. */
  walk(): Promise<void> {
    this.spaced.ran();
    this.walking ??= this.scan().finally(() => (this.walking = undefined));
    return this.walking;
  }

  private async scan(): Promise<void> {
    this.walks += 1;
    const byId = new Map<bigint, string | null>();
    const visit = async (relative: string, depth: number): Promise<void> => {
      const full = path.join(this.root, relative);
      let dir;
      try {
        byId.set((await stat(full, { bigint: true })).ino, podUidFromPath(relative) ?? null);
        if (depth >= MAX_DEPTH) return;
        dir = await opendir(full);
      } catch {
        return; // removed while walking
      }
      const children: Promise<void>[] = [];
      for await (const entry of dir) if (entry.isDirectory()) children.push(visit(path.join(relative, entry.name), depth + 1));
      await Promise.all(children);
    };
    await visit('', 0);
    this.byId = byId;
    this.byUid = new Map();
    for (const [id, uid] of byId) if (uid) this.byUid.set(uid, [...(this.byUid.get(uid) ?? []), id]);
    this.options.onWalk?.();
  }
}

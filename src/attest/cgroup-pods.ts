// cgroup id → pod UID, from the folders the kubelet makes for pods. A cgroup v2
// folder's inode number is the id that bpf_get_current_cgroup_id() and
// sock_diag report, so one walk of the tree maps every container's cgroup to its
// pod. Unknown ids trigger a walk, at most one per minWalkGapMs (a caller cannot
// make nmi walk the tree in a loop); within the gap they wait for the walk at
// its end, so a new container is late, not refused.
//
// A pod is recognised only where the kubelet puts it, by position, not by a
// name found anywhere: anyone may name a folder `pod<uid>` in a cgroup delegated
// to them (a user's `user@1000.service`, a container's own nested cgroups).
import { opendir, stat } from 'node:fs/promises';
import path from 'node:path';
import { within } from '../util/mounts.js';
import { SpacedRefresh } from '../util/spaced-refresh.js';

/** A pod UID with `separator` between its groups: `-`, or `_` in a systemd unit's name. */
const uid = (separator: string) => ['{8}', '{4}', '{4}', '{4}', '{12}'].map((n) => `[0-9a-f]${n}`).join(separator);
const QOS = 'besteffort|burstable';
/** The systemd driver: kubepods.slice/[kubepods-<qos>.slice/]kubepods-[<qos>-]pod<uid, - as _>.slice. */
const systemdQos = new RegExp(`^kubepods-(${QOS})\\.slice$`);
const systemdPod = new RegExp(`^kubepods-(?:(${QOS})-)?pod(${uid('_')})\\.slice$`);
/** The cgroupfs driver: kubepods/[<qos>/]pod<uid>. */
const cgroupfsQos = new RegExp(`^(${QOS})$`);
const cgroupfsPod = new RegExp(`^pod(${uid('-')})$`);

/** The folder names the kubelet gives the folder that holds every pod (its --cgroup-root's child). */
const KUBEPODS = ['kubepods.slice', 'kubepods'];

/**
 * The UID of the pod whose cgroup holds this folder, given relative to the kubelet's cgroup root (the folder
 * holding kubepods.slice or kubepods), or undefined. Only the kubelet's own layout counts: the pod folder
 * directly under kubepods or under its QoS folder, named for that QoS; the first such folder names the pod,
 * and everything below it (containers, their nested cgroups, whatever they are named) is that pod's.
 */
export function podUidFromPath(folder: string): string | undefined {
  const [top, first = '', second = ''] = folder.split('/');
  if (top === 'kubepods.slice') {
    const qos = systemdQos.exec(first)?.[1];
    const pod = systemdPod.exec(qos ? second : first);
    // The pod slice repeats its QoS folder's name (none for a Guaranteed pod, directly under kubepods.slice).
    return pod && pod[1] === qos ? pod[2]?.replaceAll('_', '-') : undefined;
  }
  if (top === 'kubepods') return cgroupfsPod.exec(cgroupfsQos.test(first) ? second : first)?.[1];
  return undefined;
}

/**
 * The kubelet's cgroup root for a --cgroup-root: that folder's parent when it is the kubepods folder itself
 * (the default, /sys/fs/cgroup/kubepods.slice), else the folder (it holds kubepods.slice or kubepods).
 */
export function kubeletCgroupRoot(cgroupRoot: string): string {
  const resolved = path.resolve(cgroupRoot);
  return KUBEPODS.includes(path.basename(resolved)) ? path.dirname(resolved) : resolved;
}

/** The pod UID of an absolute cgroup folder under the kubelet's cgroup root `kubeletRoot`; undefined anywhere else. */
export function podUidOf(kubeletRoot: string, folder: string): string | undefined {
  const relative = within(kubeletRoot, folder);
  return relative === undefined ? undefined : podUidFromPath(relative);
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

  /** Where the kubelet's layout starts (see kubeletCgroupRoot). */
  private readonly kubeletRoot: string;

  constructor(
    /** The folder walked: --cgroup-root for the eBPF backend, the whole cgroup v2 mount for host callers. */
    private readonly root: string,
    private readonly options: { cgroupRoot?: string; minWalkGapMs?: number; onWalk?: () => void } = {},
  ) {
    this.kubeletRoot = kubeletCgroupRoot(options.cgroupRoot ?? root);
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
        byId.set((await stat(full, { bigint: true })).ino, podUidOf(this.kubeletRoot, full) ?? null);
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

// Whom nmi trusts on its own host: at the other end of a handoff or `nmi explain`,
// and as the owner of its bindings files: root, or nmi's own uid (nmi run as a user,
// in tests). Nobody else.
export function isRootOrSelf(uid: number, ownUid = process.geteuid?.() ?? 0): boolean {
  return uid === 0 || uid === ownUid;
}

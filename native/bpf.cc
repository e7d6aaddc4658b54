// libbpf for the eBPF backend (src/rules/ebpf.ts): load nmi.bpf.o with its
// maps pinned, attach programs to a cgroup through pinned bpf_links, inspect
// and remove pins, and read/write maps. Policy (what to attach, when to
// repair) lives in TypeScript. Built only when libbpf was found at build time.
#include "addon.h"

#ifdef NMI_HAVE_BPF
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <map>
#include <string>

namespace {

// libbpf's diagnostics (verifier log included) go into the error we throw, not to stderr.
std::string g_log;
int CaptureLog(enum libbpf_print_level level, const char* format, va_list args) {
  if (level == LIBBPF_DEBUG) return 0;
  char line[1024];
  vsnprintf(line, sizeof line, format, args);
  if (g_log.size() < 8192) g_log += line;
  return 0;
}

std::map<int, bpf_object*> g_objects;
int g_next_handle = 1;

Napi::Value Fail(Napi::Env env, const std::string& what, int err) {
  std::string message = what + ": " + strerror(err < 0 ? -err : err);
  if (!g_log.empty()) message += " (" + g_log.substr(0, g_log.find_last_not_of('\n') + 1) + ")";
  g_log.clear();
  Napi::Error::New(env, message).ThrowAsJavaScriptException();
  return env.Undefined();
}

bool Args(const Napi::CallbackInfo& info, const char* usage, std::initializer_list<napi_valuetype> types) {
  size_t i = 0;
  bool ok = info.Length() == types.size();
  for (napi_valuetype type : types) {
    if (!ok) break;
    ok = info[i].Type() == type || (type == napi_object && info[i].IsBuffer());
    i++;
  }
  if (!ok) Napi::TypeError::New(info.Env(), std::string("Usage: ") + usage).ThrowAsJavaScriptException();
  return ok;
}

bpf_program* Program(const Napi::CallbackInfo& info, int handle_arg, int name_arg) {
  auto found = g_objects.find(info[handle_arg].As<Napi::Number>().Int32Value());
  if (found == g_objects.end()) return nullptr;
  std::string name = info[name_arg].As<Napi::String>();
  return bpf_object__find_program_by_name(found->second, name.c_str());
}

Napi::Value NoProgram(Napi::Env env) {
  Napi::Error::New(env, "no such eBPF object, program or map").ThrowAsJavaScriptException();
  return env.Undefined();
}

}  // namespace

namespace nmi {

Napi::Value BpfSupport(const Napi::CallbackInfo& info) { return info.Env().Null(); }

// bpfLoad(objectPath, pinDir): handle. Every map is pinned as pinDir/<name>, reused when already pinned.
Napi::Value BpfLoad(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!Args(info, "bpfLoad(objectPath: string, pinDir: string)", {napi_string, napi_string})) return env.Undefined();
  libbpf_set_print(CaptureLog);
  g_log.clear();
  std::string path = info[0].As<Napi::String>(), pin_dir = info[1].As<Napi::String>();
  bpf_object* object = bpf_object__open_file(path.c_str(), nullptr);
  if (object == nullptr) return Fail(env, "open " + path, errno);
  bpf_map* map;
  bpf_object__for_each_map(map, object) {
    std::string pin = pin_dir + "/" + bpf_map__name(map);
    int err = bpf_map__set_pin_path(map, pin.c_str());
    if (err != 0) {
      bpf_object__close(object);
      return Fail(env, "pin path " + pin, err);
    }
  }
  int err = bpf_object__load(object);
  if (err != 0) {
    bpf_object__close(object);
    return Fail(env, "load " + path, err);
  }
  int handle = g_next_handle++;
  g_objects[handle] = object;
  return Napi::Number::New(env, handle);
}

// bpfRepinMaps(handle): pins again every map of the object whose pin was removed; how many.
Napi::Value BpfRepinMaps(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!Args(info, "bpfRepinMaps(handle: number)", {napi_number})) return env.Undefined();
  auto found = g_objects.find(info[0].As<Napi::Number>().Int32Value());
  if (found == g_objects.end()) return NoProgram(env);
  int repinned = 0;
  bpf_map* map;
  bpf_object__for_each_map(map, found->second) {
    const char* pin = bpf_map__pin_path(map);
    if (pin == nullptr || access(pin, F_OK) == 0) continue;
    if (bpf_obj_pin(bpf_map__fd(map), pin) != 0) return Fail(env, std::string("pin ") + pin, errno);
    repinned++;
  }
  return Napi::Number::New(env, repinned);
}

Napi::Value BpfUnload(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!Args(info, "bpfUnload(handle: number)", {napi_number})) return env.Undefined();
  auto found = g_objects.find(info[0].As<Napi::Number>().Int32Value());
  if (found != g_objects.end()) {
    bpf_object__close(found->second);
    g_objects.erase(found);
  }
  return env.Undefined();
}

// bpfMapFd(handle, map): the loaded object's descriptor of a map (valid until bpfUnload).
Napi::Value BpfMapFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!Args(info, "bpfMapFd(handle: number, map: string)", {napi_number, napi_string})) return env.Undefined();
  auto found = g_objects.find(info[0].As<Napi::Number>().Int32Value());
  std::string name = info[1].As<Napi::String>();
  bpf_map* map = found == g_objects.end() ? nullptr : bpf_object__find_map_by_name(found->second, name.c_str());
  if (map == nullptr) return NoProgram(env);
  return Napi::Number::New(env, bpf_map__fd(map));
}

// bpfProgramId(handle, program): the kernel's id of the loaded program.
Napi::Value BpfProgramId(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!Args(info, "bpfProgramId(handle: number, program: string)", {napi_number, napi_string})) return env.Undefined();
  bpf_program* program = Program(info, 0, 1);
  if (program == nullptr) return NoProgram(env);
  bpf_prog_info prog_info = {};
  __u32 length = sizeof prog_info;
  int err = bpf_obj_get_info_by_fd(bpf_program__fd(program), &prog_info, &length);
  if (err != 0) return Fail(env, "program info", errno);
  return Napi::Number::New(env, prog_info.id);
}

// bpfAttach(handle, program, cgroupPath, linkPin): a new link, pinned over linkPin in one rename,
// so a link already pinned there stays attached until the new one is.
Napi::Value BpfAttach(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!Args(info, "bpfAttach(handle: number, program: string, cgroupPath: string, linkPin: string)",
            {napi_number, napi_string, napi_string, napi_string}))
    return env.Undefined();
  bpf_program* program = Program(info, 0, 1);
  if (program == nullptr) return NoProgram(env);
  std::string cgroup = info[2].As<Napi::String>(), pin = info[3].As<Napi::String>();
  int cgroup_fd = open(cgroup.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (cgroup_fd < 0) return Fail(env, "open " + cgroup, errno);
  g_log.clear();
  bpf_link* link = bpf_program__attach_cgroup(program, cgroup_fd);
  int saved = errno;
  close(cgroup_fd);
  if (link == nullptr) return Fail(env, std::string("attach ") + bpf_program__name(program) + " to " + cgroup, saved);
  std::string staged = pin + "_new";  // bpffs refuses names with a dot
  unlink(staged.c_str());
  int err = bpf_link__pin(link, staged.c_str());
  if (err == 0 && rename(staged.c_str(), pin.c_str()) != 0) err = -errno;
  bpf_link__destroy(link);  // the pin holds the link from now on; on failure this detaches it
  if (err != 0) {
    unlink(staged.c_str());
    return Fail(env, "pin " + pin, err);
  }
  return env.Undefined();
}

// bpfReplace(handle, program, linkPin): swaps the program of the pinned link in place (never detached).
Napi::Value BpfReplace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!Args(info, "bpfReplace(handle: number, program: string, linkPin: string)", {napi_number, napi_string, napi_string}))
    return env.Undefined();
  bpf_program* program = Program(info, 0, 1);
  if (program == nullptr) return NoProgram(env);
  std::string pin = info[2].As<Napi::String>();
  int fd = bpf_obj_get(pin.c_str());
  if (fd < 0) return Fail(env, "open " + pin, errno);
  int err = bpf_link_update(fd, bpf_program__fd(program), nullptr);
  int saved = errno;
  close(fd);
  if (err != 0) return Fail(env, "update link " + pin, saved);
  return env.Undefined();
}

// bpfLinkInfo(linkPin): null when nothing is pinned there, else what the link is attached to.
Napi::Value BpfLinkInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!Args(info, "bpfLinkInfo(linkPin: string)", {napi_string})) return env.Undefined();
  std::string pin = info[0].As<Napi::String>();
  int fd = bpf_obj_get(pin.c_str());
  if (fd < 0) {
    if (errno == ENOENT) return env.Null();
    return Fail(env, "open " + pin, errno);
  }
  bpf_link_info link_info = {};
  __u32 length = sizeof link_info;
  int err = bpf_obj_get_info_by_fd(fd, &link_info, &length);
  int saved = errno;
  close(fd);
  if (err != 0) return Fail(env, "link info " + pin + " (not a link?)", saved);
  Napi::Object out = Napi::Object::New(env);
  out.Set("id", link_info.id);
  out.Set("programId", link_info.prog_id);
  bool cgroup = link_info.type == BPF_LINK_TYPE_CGROUP;
  out.Set("cgroupId", Napi::BigInt::New(env, static_cast<uint64_t>(cgroup ? link_info.cgroup.cgroup_id : 0)));
  return out;
}

// bpfUnpin(pin, detach): false when nothing was pinned; detach=true first detaches a pinned link
// from its cgroup, so it stops even if some process still holds it.
Napi::Value BpfUnpin(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!Args(info, "bpfUnpin(pin: string, detach: boolean)", {napi_string, napi_boolean})) return env.Undefined();
  std::string pin = info[0].As<Napi::String>();
  if (info[1].As<Napi::Boolean>().Value()) {
    int fd = bpf_obj_get(pin.c_str());
    if (fd < 0 && errno == ENOENT) return Napi::Boolean::New(env, false);
    if (fd < 0) return Fail(env, "open " + pin, errno);
    int err = bpf_link_detach(fd);
    int saved = errno;
    close(fd);
    if (err != 0 && saved != EINVAL) return Fail(env, "detach " + pin, saved);  // EINVAL: already detached
  }
  if (unlink(pin.c_str()) != 0) {
    if (errno == ENOENT) return Napi::Boolean::New(env, false);
    return Fail(env, "unpin " + pin, errno);
  }
  return Napi::Boolean::New(env, true);
}

// bpfMapLookup(fd, key, valueSize): the value, or null when the key is absent.
Napi::Value BpfMapLookup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!Args(info, "bpfMapLookup(fd: number, key: Buffer, valueSize: number)", {napi_number, napi_object, napi_number}))
    return env.Undefined();
  auto key = info[1].As<Napi::Buffer<uint8_t>>();
  auto value = Napi::Buffer<uint8_t>::New(env, info[2].As<Napi::Number>().Uint32Value());
  if (bpf_map_lookup_elem(info[0].As<Napi::Number>().Int32Value(), key.Data(), value.Data()) != 0) {
    if (errno == ENOENT) return env.Null();
    return Fail(env, "map lookup", errno);
  }
  return value;
}

// bpfMapUpdate(fd, key, value).
Napi::Value BpfMapUpdate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!Args(info, "bpfMapUpdate(fd: number, key: Buffer, value: Buffer)", {napi_number, napi_object, napi_object}))
    return env.Undefined();
  auto key = info[1].As<Napi::Buffer<uint8_t>>();
  auto value = info[2].As<Napi::Buffer<uint8_t>>();
  if (bpf_map_update_elem(info[0].As<Napi::Number>().Int32Value(), key.Data(), value.Data(), BPF_ANY) != 0)
    return Fail(env, "map update", errno);
  return env.Undefined();
}

}  // namespace nmi

#else  // built without libbpf: only bpfSupport is exported, and it says why

namespace nmi {
Napi::Value BpfSupport(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), "this nmi was built without eBPF support (clang and libbpf-dev were missing at build time; install them and rebuild)");
}
}  // namespace nmi

#endif

{
  "variables": {
    "have_bpf%": "<!(sh native/bpf/detect.sh)"
  },
  "targets": [
    {
      "target_name": "nmi",
      "sources": ["native/addon.cc", "native/nft.cc", "native/notify.cc", "native/listen.cc", "native/netns.cc", "native/memory.cc", "native/exec.cc", "native/sockdiag.cc", "native/process.cc", "native/errors.cc", "native/server.cc", "native/server-js.cc", "native/connection.cc", "native/http-parse.cc", "native/token-request.cc", "native/bpf.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
      "cflags": ["-fvisibility=hidden", "-fstack-protector-strong", "-Wall", "-Wextra"],
      "cflags_cc": ["-fvisibility=hidden", "-fstack-protector-strong", "-Wall", "-Wextra", "-std=c++17"],
      "libraries": ["-ldl", "-lpthread"],
      # The Debian package ships libbpf.so.1 beside the addon (Ubuntu 22.04 has only libbpf0).
      "ldflags": ["-Wl,-rpath,'$$ORIGIN'"],
      "conditions": [
        ["have_bpf==1", {
          "defines": ["NMI_HAVE_BPF"],
          "libraries": ["-lbpf"],
          "dependencies": ["nmi_bpf"]
        }]
      ]
    },
    {
      "target_name": "nmi_bpf",
      "type": "none",
      "conditions": [
        ["have_bpf==1", {
          "actions": [{
            "action_name": "bpf_object",
            "inputs": ["native/bpf/nmi.bpf.c"],
            "outputs": ["<(PRODUCT_DIR)/nmi.bpf.o"],
            "action": ["sh", "native/bpf/build.sh", "<@(_inputs)", "<@(_outputs)"]
          }]
        }]
      ]
    }
  ]
}

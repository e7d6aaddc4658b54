{
  "targets": [
    {
      "target_name": "nmi",
      "sources": ["native/addon.cc", "native/nft.cc", "native/notify.cc", "native/netns.cc", "native/server.cc", "native/http-parse.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
      "cflags": ["-fvisibility=hidden", "-fstack-protector-strong", "-Wall", "-Wextra"],
      "cflags_cc": ["-fvisibility=hidden", "-fstack-protector-strong", "-Wall", "-Wextra", "-std=c++17"],
      "libraries": ["-ldl", "-lpthread"]
    }
  ]
}

{
  "variables": { "with_uring%": 1 },
  "targets": [
    {
      "target_name": "fastmem",
      "sources": ["native/fastmem.c"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"],
      "cflags_c": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror=implicit-function-declaration"]
    }
  ],
  "conditions": [
    ["with_uring==1", {
      "targets": [
        {
          "target_name": "uring",
          "sources": ["native/uring.c"],
          "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"],
          "cflags_c": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror=implicit-function-declaration"],
          "libraries": ["-luring"]
        }
      ]
    }]
  ]
}

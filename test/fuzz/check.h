// The fuzz targets' invariant check: a failed one aborts, which libFuzzer reports as a finding.
#pragma once
#include <cstdio>
#include <cstdlib>

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      fprintf(stderr, "invariant failed at line %d: %s\n", __LINE__, #cond); \
      abort();                                                             \
    }                                                                      \
  } while (0)

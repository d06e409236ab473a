// kmd_conformance_test's main: PoCL's kernel cache goes under the build tree, so program builds
// are warm after the first run.
#include <gtest/gtest.h>
#include <stdlib.h>

int main(int argc, char** argv) {
  ::setenv("POCL_CACHE_DIR", GPUP_CONFORMANCE_POCL_CACHE_DIR, /*overwrite=*/0);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}

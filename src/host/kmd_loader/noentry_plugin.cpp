// Test fixture for kmd_loader_unittest: a loadable shared object that is not a KMD (it does not
// export GpupKmdDriverEntry).
extern "C" __attribute__((visibility("default"))) int gpup_not_a_kmd(void) { return 42; }

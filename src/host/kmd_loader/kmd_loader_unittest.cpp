#include "host/kmd_loader/kmd_loader.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

namespace gpup::kmd {
namespace {

void test_log(GPUPDDI_SYSTEM_HANDLE, int, const char*) {}
void test_notify(GPUPDDI_SYSTEM_HANDLE, uint64_t, gpup_status) {}
void other_notify(GPUPDDI_SYSTEM_HANDLE, uint64_t, gpup_status) {}

GPUPDDI_CALLBACKS test_callbacks() {
  GPUPDDI_CALLBACKS cb{};
  cb.struct_size = sizeof(cb);
  cb.pfnLog = test_log;
  cb.pfnNotifySubmissionComplete = test_notify;
  return cb;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

GPUPDDI_HANDLE start(const Driver& d, const char* config = "") {
  GPUPDDI_ARG_STARTADAPTER args{};
  args.struct_size = sizeof(args);
  args.pConfig = config;
  EXPECT_EQ(d.ddi().Adapter.pfnStartAdapter(&args), GPUP_STATUS_SUCCESS);
  return args.hAdapter;
}

TEST(KmdLoader, LoadsTheMockByShortName) {
  auto d = Driver::load("mock", test_callbacks());
  ASSERT_TRUE(d.ok()) << d.error().message;
  EXPECT_EQ((*d)->name(), "kmd_mock");
  EXPECT_TRUE(contains((*d)->path(), "/libgpup_kmd_mock.so")) << (*d)->path();
  EXPECT_EQ((*d)->ddi().DdiVersion >> 16, GPUPDDI_VERSION_MAJOR);
  EXPECT_NE((*d)->ddi().Adapter.pfnEscape, nullptr);
}

TEST(KmdLoader, QueriesAdapterCaps) {
  auto d = Driver::load("mock", test_callbacks());
  ASSERT_TRUE(d.ok()) << d.error().message;
  GPUPDDI_HANDLE adapter = start(**d);
  auto caps = query_adapter_caps(**d, adapter);
  ASSERT_TRUE(caps.ok()) << caps.error().message;
  EXPECT_EQ(caps->driver.MemoryManagementCaps.ParavirtualizationSupported, 1u);
  EXPECT_EQ(caps->driver.MemoryManagementCaps.IoMmuSecureModeSupported, 1u);
  EXPECT_EQ(caps->driver.NodeCount, 1u);
  EXPECT_EQ(caps->levels.size(), caps->mmu.PageTableLevelCount);
  EXPECT_GE(caps->segments.NbSegment, 1u);
  EXPECT_EQ(caps->driver.MaxAllocationSize, caps->info.MaxAllocSize);
  EXPECT_STREQ(caps->info.Name, "gpup mock device");
  (*d)->ddi().Adapter.pfnStopAdapter(adapter);
}

TEST(KmdLoader, VariantsReportTheirCaps) {
  for (const auto& [name, pv, secure] : {std::tuple{"mock_nopv", 0u, 1u}, std::tuple{"mock_nosecure", 1u, 0u}}) {
    auto d = Driver::load(name, test_callbacks());
    ASSERT_TRUE(d.ok()) << d.error().message;
    GPUPDDI_HANDLE adapter = start(**d);
    auto caps = query_adapter_caps(**d, adapter);
    ASSERT_TRUE(caps.ok()) << caps.error().message;
    EXPECT_EQ(caps->driver.MemoryManagementCaps.ParavirtualizationSupported, pv) << name;
    EXPECT_EQ(caps->driver.MemoryManagementCaps.IoMmuSecureModeSupported, secure) << name;
    (*d)->ddi().Adapter.pfnStopAdapter(adapter);
  }
}

TEST(KmdLoader, SharesOneDriverPerPluginAndCallbacks) {
  auto a = Driver::load("mock", test_callbacks());
  auto b = Driver::load("mock", test_callbacks());
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->get(), b->get());
  GPUPDDI_CALLBACKS other = test_callbacks();
  other.pfnNotifySubmissionComplete = other_notify;
  auto c = Driver::load("mock", other);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status(), GPUP_STATUS_ALREADY_EXISTS);
  a->reset();
  b->reset();
  auto d = Driver::load("mock", other);  // the first Driver is gone: other callbacks are fine now
  EXPECT_TRUE(d.ok()) << d.error().message;
}

TEST(KmdLoader, RefusesMissingMandatoryEntry) {
  auto d = Driver::load("mock_missing", test_callbacks());
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status(), GPUP_STATUS_NOT_SUPPORTED);
  EXPECT_TRUE(contains(d.error().message, "libgpup_kmd_mock_missing.so lacks mandatory DDI Context.pfnCreateContext"))
      << d.error().message;
}

TEST(KmdLoader, RefusesWrongMajorVersion) {
  auto d = Driver::load("mock_badversion", test_callbacks());
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status(), GPUP_STATUS_VERSION_MISMATCH);
  EXPECT_TRUE(contains(d.error().message, "implements DDI 99.")) << d.error().message;
}

TEST(KmdLoader, RefusesCallbacksWithoutNotify) {
  GPUPDDI_CALLBACKS cb = test_callbacks();
  cb.pfnNotifySubmissionComplete = nullptr;
  auto d = Driver::load("mock", cb);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status(), GPUP_STATUS_INVALID_PARAMETER);
}

TEST(KmdLoader, BadPathsGiveClearErrors) {
  auto missing_file = Driver::load("/nonexistent/libgpup_kmd_x.so", test_callbacks());
  ASSERT_FALSE(missing_file.ok());
  EXPECT_EQ(missing_file.status(), GPUP_STATUS_NOT_FOUND);
  EXPECT_TRUE(contains(missing_file.error().message, "/nonexistent/libgpup_kmd_x.so: no such file"))
      << missing_file.error().message;

  auto unknown = Driver::load("nosuchkmd", test_callbacks());
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.status(), GPUP_STATUS_NOT_FOUND);
  EXPECT_TRUE(contains(unknown.error().message, "libgpup_kmd_nosuchkmd.so) not found in: ")) << unknown.error().message;
  EXPECT_TRUE(contains(unknown.error().message, GPUP_KMD_DIR_FOR_TESTS)) << unknown.error().message;

  auto bad_name = Driver::load("mock;rm", test_callbacks());
  ASSERT_FALSE(bad_name.ok());
  EXPECT_EQ(bad_name.status(), GPUP_STATUS_INVALID_PARAMETER);

  auto empty = Driver::load("", test_callbacks());
  EXPECT_EQ(empty.status(), GPUP_STATUS_INVALID_PARAMETER);
}

TEST(KmdLoader, RefusesFilesThatAreNotKmds) {
  const std::string dir = ::testing::TempDir();
  const std::string junk = dir + "/libgpup_kmd_junk_" + std::to_string(::getpid()) + ".so";
  { std::ofstream(junk) << "this is not an ELF file\n"; }
  auto d = Driver::load(junk, test_callbacks());
  std::remove(junk.c_str());
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status(), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_TRUE(contains(d.error().message, "cannot be loaded")) << d.error().message;

  auto noentry = Driver::load("noentry_test", test_callbacks());
  ASSERT_FALSE(noentry.ok());
  EXPECT_EQ(noentry.status(), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_TRUE(contains(noentry.error().message, "does not export GpupKmdDriverEntry")) << noentry.error().message;
}

TEST(KmdLoader, SearchesGpupKmdPathFirst) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(::testing::TempDir()) / ("kmd_path_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto mock = resolve_kmd_path("mock");
  ASSERT_TRUE(mock.ok()) << mock.error().message;
  fs::create_symlink(fs::absolute(*mock), dir / "libgpup_kmd_alias.so");

  ::setenv("GPUP_KMD_PATH", (":" + dir.string() + "::/nonexistent").c_str(), 1);
  const std::vector<std::string> dirs = kmd_search_dirs();
  auto alias = resolve_kmd_path("alias");
  auto d = Driver::load("alias", test_callbacks());
  ::unsetenv("GPUP_KMD_PATH");
  fs::remove_all(dir);

  ASSERT_GE(dirs.size(), 4u);
  EXPECT_EQ(dirs[0], dir.string());
  EXPECT_EQ(dirs[1], "/nonexistent");
  EXPECT_EQ(dirs.back(), GPUP_KMD_DIR_FOR_TESTS);
  ASSERT_TRUE(alias.ok()) << alias.error().message;
  EXPECT_EQ(*alias, (dir / "libgpup_kmd_alias.so").string());
  ASSERT_TRUE(d.ok()) << d.error().message;
  EXPECT_EQ((*d)->name(), "kmd_mock");
}

TEST(KmdLoader, ConfigToKmdLines) {
  auto ok = config_to_kmd_lines({{"platform", "Portable Computing Language"}, {"device", "0"}});
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, "device=0\nplatform=Portable Computing Language\n");
  EXPECT_EQ(config_to_kmd_lines({}).value(), "");
  EXPECT_FALSE(config_to_kmd_lines({{"device", "0\nplatform=evil"}}).ok());
  EXPECT_FALSE(config_to_kmd_lines({{"a=b", "c"}}).ok());
  EXPECT_FALSE(config_to_kmd_lines({{"", "c"}}).ok());
  EXPECT_FALSE(config_to_kmd_lines({{"#x", "c"}}).ok());
  EXPECT_FALSE(config_to_kmd_lines({{" x", "c"}}).ok());
  EXPECT_FALSE(config_to_kmd_lines({{"x", std::string("a\0b", 3)}}).ok());
}

}  // namespace
}  // namespace gpup::kmd

// The driver store: the INF manifest of a KMD package, and how its files reach a VM's
// HostDriverStore (CopyToVmOverwrite always, CopyToVmWhenNewer by version, then modification time).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "host/gpupd/driver_store.h"

namespace gpup::gpupd {
namespace {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/gpupd-store-ut-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::system(("rm -rf '" + path_ + "'").c_str()); }
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void write(const std::string& path, const std::string& text) {
  std::system(("mkdir -p \"$(dirname '" + path + "')\"").c_str());
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
}

std::string read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Sets a file's modification time to <seconds> since the epoch.
void set_mtime(const std::string& path, time_t seconds) {
  timespec t[2] = {{seconds, 0}, {seconds, 0}};
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), t, 0), 0) << path;
}

// A package directory with one file "umd.so" and a manifest that copies it with <mode> at
// <version> (DriverVer) into the store as lib/umd.so.
std::string inf_text(const std::string& key, const std::string& version, const std::string& extra = "") {
  return "; test package\n"
         "[Version]\n"
         "Signature = \"$GPUP$\"\n"
         "Class = ComputeAccelerator\n"
         "DriverVer = 01/02/2025," + version + "\n"
         "\n[DDInstall]\n"
         "HKR,\"" + key + "\",Umd,%REG_MULTI_SZ%,\"umd.so\",\"lib/umd.so\"  ; the UMD\n" + extra +
         "\n[Strings]\nREG_MULTI_SZ = 0x00010000\nREG_SZ = 0x00000000\n";
}

struct Fixture {
  TempDir pkg_dir, store_parent;
  std::string store() const { return store_parent.file("HostDriverStore"); }
  std::string stored() const { return store() + "/lib/umd.so"; }

  // Writes the package (manifest + umd.so with <content>, mtime <mtime>) and populates the store.
  std::vector<StoreAction> install(const std::string& key, const std::string& version, const std::string& content,
                                   time_t mtime) {
    write(pkg_dir.file("pkg.inf"), inf_text(key, version));
    write(pkg_dir.file("umd.so"), content);
    set_mtime(pkg_dir.file("umd.so"), mtime);
    auto pkg = load_inf(pkg_dir.file("pkg.inf"));
    EXPECT_TRUE(pkg.ok()) << pkg.error().message;
    if (!pkg.ok()) return {};
    auto r = populate_store(*pkg, store());
    EXPECT_TRUE(r.ok()) << r.error().message;
    if (!r.ok()) return {};
    return *r;
  }
};

constexpr time_t kOld = 1600000000, kNew = 1700000000;

TEST(DriverStore, ParsesTheOpenCLPackageManifest) {
  auto pkg = load_inf(GPUP_OPENCL_INF);
  ASSERT_TRUE(pkg.ok()) << pkg.error().message;
  EXPECT_EQ(pkg->class_name, "ComputeAccelerator");
  EXPECT_EQ(pkg->driver_date, "05/14/2025");
  ASSERT_EQ(pkg->files.size(), 2u);
  EXPECT_EQ(pkg->files[0].mode, CopyMode::kOverwrite);
  EXPECT_EQ(pkg->files[0].source, "libgpupocl.so");
  EXPECT_EQ(pkg->files[0].destination, "lib/libgpupocl.so");
  EXPECT_EQ(pkg->files[1].mode, CopyMode::kWhenNewer);
  EXPECT_EQ(pkg->files[1].source, "gpup-icd/gpup.icd");
  EXPECT_EQ(pkg->files[1].destination, "OpenCL/vendors/gpup.icd");
}

TEST(DriverStore, InfPathSitsBesideThePlugin) {
  EXPECT_EQ(kmd_inf_path("/opt/gpup/lib/libgpup_kmd_opencl.so"), "/opt/gpup/lib/gpup_kmd_opencl.inf");
  EXPECT_EQ(kmd_inf_path("/x/libgpup_kmd_mock.so.1"), "/x/gpup_kmd_mock.inf");
}

TEST(DriverStore, OverwriteReplacesAnOlderStoreFile) {
  Fixture f;
  f.install("CopyToVmOverwrite", "1.0.0.0", "first", kOld);
  auto a = f.install("CopyToVmOverwrite", "2.0.0.0", "second", kNew);
  ASSERT_EQ(a.size(), 1u);
  EXPECT_TRUE(a[0].copied);
  EXPECT_EQ(read(f.stored()), "second");
}

TEST(DriverStore, OverwriteReplacesANewerStoreFile) {
  Fixture f;
  f.install("CopyToVmOverwrite", "2.0.0.0", "newer", kNew);
  // The host's file is older by version and by time: Overwrite replaces it all the same.
  auto a = f.install("CopyToVmOverwrite", "1.0.0.0", "older", kOld);
  ASSERT_EQ(a.size(), 1u);
  EXPECT_TRUE(a[0].copied);
  EXPECT_EQ(read(f.stored()), "older");
  struct stat st {};
  ASSERT_EQ(::stat(f.stored().c_str(), &st), 0);
  EXPECT_EQ(st.st_mtime, kOld);  // the copy keeps the source's time
}

TEST(DriverStore, WhenNewerCopiesAFileAbsentFromTheStore) {
  Fixture f;
  auto a = f.install("CopyToVmWhenNewer", "1.0.0.0", "first", kOld);
  ASSERT_EQ(a.size(), 1u);
  EXPECT_TRUE(a[0].copied) << a[0].reason;
  EXPECT_EQ(read(f.stored()), "first");
}

TEST(DriverStore, WhenNewerReplacesWithANewerVersionEvenIfOlderInTime) {
  Fixture f;
  f.install("CopyToVmWhenNewer", "1.0.0.0", "v1", kNew);
  auto a = f.install("CopyToVmWhenNewer", "1.0.1.0", "v1.0.1", kOld);  // version first
  ASSERT_EQ(a.size(), 1u);
  EXPECT_TRUE(a[0].copied) << a[0].reason;
  EXPECT_EQ(read(f.stored()), "v1.0.1");
}

TEST(DriverStore, WhenNewerKeepsTheStoreFileOfANewerVersionEvenIfOlderInTime) {
  Fixture f;
  f.install("CopyToVmWhenNewer", "2.0.0.0", "v2", kOld);
  auto a = f.install("CopyToVmWhenNewer", "1.9.0.0", "v1.9", kNew);
  ASSERT_EQ(a.size(), 1u);
  EXPECT_FALSE(a[0].copied) << a[0].reason;
  EXPECT_NE(a[0].reason.find("newer version 2.0.0.0"), std::string::npos) << a[0].reason;
  EXPECT_EQ(read(f.stored()), "v2");
}

TEST(DriverStore, WhenNewerWithEqualVersionReplacesWhenTheHostFileIsNewer) {
  Fixture f;
  f.install("CopyToVmWhenNewer", "1.0.0.0", "built first", kOld);
  auto a = f.install("CopyToVmWhenNewer", "1.0.0.0", "rebuilt", kNew);
  ASSERT_EQ(a.size(), 1u);
  EXPECT_TRUE(a[0].copied) << a[0].reason;
  EXPECT_EQ(read(f.stored()), "rebuilt");
}

TEST(DriverStore, WhenNewerWithEqualVersionKeepsTheStoreFileWhenTheHostFileIsOlder) {
  Fixture f;
  f.install("CopyToVmWhenNewer", "1.0.0.0", "store copy", kNew);
  auto a = f.install("CopyToVmWhenNewer", "1.0.0.0", "older build", kOld);
  ASSERT_EQ(a.size(), 1u);
  EXPECT_FALSE(a[0].copied) << a[0].reason;
  EXPECT_EQ(read(f.stored()), "store copy");
  // And an identical time is not newer either.
  a = f.install("CopyToVmWhenNewer", "1.0.0.0", "same time", kNew);
  EXPECT_FALSE(a[0].copied) << a[0].reason;
  EXPECT_EQ(read(f.stored()), "store copy");
}

TEST(DriverStore, PerFileVersionOverridesDriverVer) {
  Fixture f;
  f.install("CopyToVmWhenNewer", "5.0.0.0", "v5", kOld);
  // DriverVer goes up, but umd.so itself says 4.0: the store's 5.0 copy stays.
  write(f.pkg_dir.file("pkg.inf"), inf_text("CopyToVmWhenNewer", "6.0.0.0", "\n[FileVersions]\numd.so = 4.0\n"));
  write(f.pkg_dir.file("umd.so"), "v4");
  set_mtime(f.pkg_dir.file("umd.so"), kNew);
  auto pkg = load_inf(f.pkg_dir.file("pkg.inf"));
  ASSERT_TRUE(pkg.ok()) << pkg.error().message;
  EXPECT_EQ(pkg->files[0].version.str(), "4.0.0.0");
  auto a = populate_store(*pkg, f.store());
  ASSERT_TRUE(a.ok()) << a.error().message;
  EXPECT_FALSE((*a)[0].copied) << (*a)[0].reason;
  EXPECT_EQ(read(f.stored()), "v5");
}

TEST(DriverStore, VersionsCompareNumericallyFromTheMostSignificantPart) {
  auto v = [](const char* t) { return *parse_file_version(t); };
  EXPECT_LT(v("1.9.0.0"), v("1.10.0.0"));
  EXPECT_LT(v("1.2.3.4"), v("2"));
  EXPECT_EQ(v("1.2"), v("1.2.0.0"));
  EXPECT_FALSE(parse_file_version("1.2.3.4.5").ok());
  EXPECT_FALSE(parse_file_version("1.x").ok());
  EXPECT_FALSE(parse_file_version("70000").ok());
}

TEST(DriverStore, RefusesDestinationsOutsideTheStore) {
  for (const char* dest : {"../escape.so", "lib/../../escape.so", "/etc/passwd", "lib//umd.so", "./umd.so",
                           "lib\\umd.so", ".gpup-store.json"}) {
    std::string text = inf_text("CopyToVmOverwrite", "1.0", "");
    text.replace(text.find("\"lib/umd.so\""), 12, std::string("\"") + dest + "\"");
    auto pkg = parse_inf(text, "t.inf");
    ASSERT_FALSE(pkg.ok()) << dest;
    EXPECT_NE(pkg.error().message.find("t.inf:8: destination"), std::string::npos) << pkg.error().message;
  }
}

TEST(DriverStore, RefusesSourcesOutsideThePackage) {
  for (const char* src : {"../../etc/shadow", "/etc/shadow"}) {
    std::string text = inf_text("CopyToVmOverwrite", "1.0", "");
    text.replace(text.find("\"umd.so\""), 8, std::string("\"") + src + "\"");
    auto pkg = parse_inf(text, "t.inf");
    ASSERT_FALSE(pkg.ok()) << src;
    EXPECT_NE(pkg.error().message.find("source"), std::string::npos) << pkg.error().message;
  }
}

TEST(DriverStore, BadManifestsFailWithAClearError) {
  struct Case {
    std::string text, expect;
  };
  const std::string ok_version = "[Version]\nClass=ComputeAccelerator\nDriverVer=01/02/2025,1.0\n";
  std::vector<Case> cases = {
      {"[DDInstall]\n", "no [Version] section"},
      {"[Version]\nClass=Display\nDriverVer=01/02/2025,1.0\n", "Class=Display is not a compute accelerator package"},
      {"[Version]\nDriverVer=01/02/2025,1.0\n", "has no Class"},
      {"[Version]\nClass=ComputeAccelerator\n", "has no DriverVer"},
      {"[Version]\nClass=ComputeAccelerator\nDriverVer=1.0\n", "DriverVer '1.0' is not 'mm/dd/yyyy,a.b.c.d'"},
      {"[Version]\nClass=ComputeAccelerator\nDriverVer=13/40/2025,1.0\n", "t.inf:3: DriverVer date"},
      {ok_version + "[DDInstall]\nCopyFiles=x\n", "t.inf:5: unsupported [DDInstall] directive 'CopyFiles=x'"},
      {ok_version + "[DDInstall]\nHKR,\"CopyToVmSometimes\",A,0,\"a\"\n", "unknown key \"CopyToVmSometimes\""},
      {ok_version + "[DDInstall]\nHKR,\"CopyToVmOverwrite\",A,%REG_MULTI_SZ%,\"a\"\n", "%REG_MULTI_SZ% is not defined"},
      {ok_version + "[DDInstall]\nHKR,\"CopyToVmOverwrite\",A,0x10001,\"a\"\n", "neither REG_SZ nor REG_MULTI_SZ"},
      {ok_version + "[DDInstall]\nHKR,\"CopyToVmOverwrite\",A,0,\"a\",\"b\"\n", "a REG_SZ value holds one string"},
      {ok_version + "[DDInstall]\nHKR,\"CopyToVmOverwrite\",A,0x10000,\"a\",\"b\",\"c\"\n", "at most 2 strings"},
      {ok_version + "[DDInstall]\nHKR,\"CopyToVmOverwrite\",A,0x10000,\"a\n", "unterminated quoted string"},
      {ok_version + "[DDInstall]\nHKR,\"CopyToVmOverwrite\",A\n", "an HKR line is"},
      {ok_version + "[DDInstall]\nHKR,\"CopyToVmOverwrite\",A,0,\"a\"\nHKR,\"CopyToVmWhenNewer\",B,0,\"x/a\"\n",
       "destination 'a' is listed twice"},
      {"Class=ComputeAccelerator\n", "text before the first [section]"},
      {"[Version\n", "malformed section header"},
  };
  for (const auto& c : cases) {
    auto pkg = parse_inf(c.text, "t.inf");
    ASSERT_FALSE(pkg.ok()) << c.text;
    EXPECT_NE(pkg.error().message.find(c.expect), std::string::npos)
        << "manifest:\n" << c.text << "error: " << pkg.error().message << "\nexpected: " << c.expect;
  }
}

TEST(DriverStore, AMissingSourceFailsNamingIt) {
  TempDir pkg_dir, store;
  write(pkg_dir.file("pkg.inf"), inf_text("CopyToVmOverwrite", "1.0"));
  auto pkg = load_inf(pkg_dir.file("pkg.inf"));
  ASSERT_TRUE(pkg.ok()) << pkg.error().message;
  auto r = populate_store(*pkg, store.file("s"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find(pkg_dir.file("umd.so")), std::string::npos) << r.error().message;
}

TEST(DriverStore, IcdManifestNamesTheLibraryByItsStorePath) {
  TempDir pkg_dir, parent;
  write(pkg_dir.file("pkg.inf"),
        "[Version]\nClass=ComputeAccelerator\nDriverVer=01/02/2025,1.0\n[DDInstall]\n"
        "HKR,\"CopyToVmOverwrite\",Umd,0x10000,\"libumd.so\",\"lib/libumd.so\"\n"
        "HKR,\"CopyToVmWhenNewer\",Icd,0x10000,\"icd/x.icd\",\"OpenCL/vendors/x.icd\"\n"
        "HKR,\"CopyToVmOverwrite\",Other,0x10000,\"other.icd\"\n");
  write(pkg_dir.file("libumd.so"), "ELF");
  write(pkg_dir.file("icd/x.icd"), "/build/tree/lib/libumd.so\n");
  write(pkg_dir.file("other.icd"), "libsomething-else.so\n");
  auto pkg = load_inf(pkg_dir.file("pkg.inf"));
  ASSERT_TRUE(pkg.ok()) << pkg.error().message;
  std::string store = parent.file("HostDriverStore");
  auto r = populate_store(*pkg, store);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(read(store + "/OpenCL/vendors/x.icd"), store + "/lib/libumd.so\n");
  EXPECT_EQ(read(store + "/other.icd"), "libsomething-else.so\n");  // not of the package: unchanged
  EXPECT_EQ(read(store + "/lib/libumd.so"), "ELF");
  // The store's manifest records what was copied.
  std::string manifest = read(store + "/" + kDriverStoreManifest);
  EXPECT_NE(manifest.find("\"lib/libumd.so\""), std::string::npos) << manifest;
  EXPECT_NE(manifest.find("\"1.0.0.0\""), std::string::npos) << manifest;
}

TEST(DriverStore, PrepareWithoutAManifestLeavesAnEmptyStore) {
  TempDir plugin_dir, parent;
  write(plugin_dir.file("libgpup_kmd_none.so"), "");
  std::string store = parent.file("HostDriverStore");
  Status s = prepare_vm_store("v", plugin_dir.file("libgpup_kmd_none.so"), store);
  ASSERT_TRUE(s.ok()) << s.error().message;
  struct stat st {};
  EXPECT_EQ(::stat(store.c_str(), &st), 0);
  // With a bad manifest the VM's start fails, saying why.
  write(plugin_dir.file("gpup_kmd_none.inf"), "[Version]\nClass=Display\n");
  s = prepare_vm_store("v", plugin_dir.file("libgpup_kmd_none.so"), store);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("driver store: "), std::string::npos) << s.error().message;
  EXPECT_NE(s.error().message.find("Class=Display"), std::string::npos) << s.error().message;
}

}  // namespace
}  // namespace gpup::gpupd

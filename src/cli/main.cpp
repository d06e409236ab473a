// gpup: the operator CLI of a gpup host, in the spirit of Hyper-V's GPU partition cmdlets
// (Get-VMHostPartitionableGpu -> gpup adapters, Add-/Set-/Get-VMGpuPartitionAdapter -> gpup vm ...).
#include <iostream>

#include <CLI/CLI.hpp>

#include "cli/cli.h"

using namespace gpup::cli;

int main(int argc, char** argv) {
  CLI::App app{"gpup: operate a gpup host (GPU paravirtualization: partitions of compute adapters)\n"
               "The host is found through $GPUP_RUNTIME_DIR (default /run/gpup) and $GPUP_STATE_DIR\n"
               "(default /var/lib/gpup)."};
  app.require_subcommand(1);
  Context ctx = context_from_env();

  auto* host = app.add_subcommand("host", "start, stop or query the host daemon (gpupd)");
  host->require_subcommand(1);
  std::string config, vmwp;
  bool foreground = false, as_json = false;
  auto* host_start = host->add_subcommand("start", "start gpupd in the background; returns once it answers");
  host_start->add_option("--config", config, "gpupd's TOML configuration (default: one PoCL adapter)");
  host_start->add_option("--vmwp", vmwp, "the VM worker program (default: gpup-vmwp beside gpupd)");
  host_start->add_flag("--foreground", foreground, "run gpupd in this terminal instead");
  auto* host_stop = host->add_subcommand("stop", "stop gpupd and its VM workers");
  auto* host_status = host->add_subcommand("status", "show whether gpupd runs, and its summary");
  host_status->add_flag("--json", as_json, "print gpupd's JSON reply");

  auto* adapters = app.add_subcommand("adapters", "list the host's adapters and what is left to partition");
  adapters->add_flag("--json", as_json, "print gpupd's JSON reply");

  auto* vm = app.add_subcommand("vm", "manage partitions (VMs)");
  vm->require_subcommand(1);
  std::string name;
  VmOptions opts;
  auto add_settings = [&](CLI::App* c) {
    c->add_option("--min-vram", opts.min_vram, "VRAM reserved for the partition (e.g. 256MiB)");
    c->add_option("--max-vram", opts.max_vram, "most VRAM the partition may use (default: the adapter's)");
    c->add_option("--optimal-vram", opts.optimal_vram, "VRAM the partition should get (default: max)");
    c->add_option("--compute-weight", opts.compute_weight, "relative share of device time, 1-10000 (default 100)")
        ->check(CLI::NonNegativeNumber);
    c->add_option("--max-compute", opts.max_compute, "cap on device time in percent, 1-100 (default 100)")
        ->check(CLI::NonNegativeNumber);
    c->add_option("--build-timeout", opts.build_timeout,
                  "seconds a device program build may take before the partition is reset, 1-3600 (default 300)")
        ->check(CLI::NonNegativeNumber);
    c->add_option("--allow-user", opts.allow_users,
                  "a user (name or uid) allowed to run guests in the partition besides root; repeat or "
                  "comma-separate; 'none' clears")
        ->delimiter(',');
    c->add_option("--allow-group", opts.allow_groups,
                  "a group whose members may run guests in the partition; repeat or comma-separate; 'none' clears")
        ->delimiter(',');
    c->add_flag("--json", as_json, "print gpupd's JSON reply");
  };
  auto* vm_add = vm->add_subcommand("add", "add a partition and start its worker");
  vm_add->add_option("name", name, "the VM's name (1-64 of A-Z a-z 0-9 _ . -)")->required();
  vm_add->add_option("--adapter", opts.adapter, "adapter to partition (default: the first partitionable one)");
  vm_add->add_flag("--secure", opts.secure, "a secure VM (needs IoMmuSecureModeSupported)");
  add_settings(vm_add);
  auto* vm_set = vm->add_subcommand("set", "change a partition's settings");
  vm_set->add_option("name", name, "the VM")->required();
  add_settings(vm_set);
  auto* vm_list = vm->add_subcommand("list", "list partitions");
  vm_list->add_flag("--json", as_json, "print gpupd's JSON reply");
  auto* vm_show = vm->add_subcommand("show", "show a partition, its worker and its usage");
  vm_show->add_option("name", name, "the VM")->required();
  vm_show->add_flag("--json", as_json, "print gpupd's JSON reply");
  auto* vm_remove = vm->add_subcommand("remove", "stop a partition's worker and delete the partition");
  vm_remove->add_option("name", name, "the VM")->required();
  auto* vm_start = vm->add_subcommand("start", "start a partition's worker again (e.g. after it failed)");
  vm_start->add_option("name", name, "the VM")->required();
  vm_start->add_flag("--json", as_json, "print gpupd's JSON reply");
  auto* vm_reset = vm->add_subcommand("reset", "bring back a partition removed after repeated TDRs or crashes");
  vm_reset->add_option("name", name, "the VM")->required();
  vm_reset->add_flag("--json", as_json, "print gpupd's JSON reply");

  auto* run = app.add_subcommand("run", "run a program in a partition: gpup run --vm NAME -- CMD [ARGS...]");
  std::vector<std::string> command;
  RunOptions run_opts;
  bool no_sandbox = false;
  run->add_option("--vm", name, "the VM")->required();
  run->add_flag("--no-sandbox", no_sandbox, "run the program as a plain child process, unconfined (debugging)");
  run->add_flag("--network", run_opts.network, "let the program use the host's network (default: none)");
  run->add_flag("--allow-unsandboxed", run_opts.allow_unsandboxed,
                "if this host refuses the sandbox's namespaces, run unconfined with a warning");
  run->add_option("command", command, "the program and its arguments (best after --)")->required();
  run->positionals_at_end();  // from the program's name on, every argument is the program's

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::cerr << "gpup: " << e.what() << " (see gpup --help)\n";
    return 1;
  }

  try {
    if (host_start->parsed()) return cmd_host_start(ctx, config, vmwp, foreground);
    if (host_stop->parsed()) return cmd_host_stop(ctx);
    if (host_status->parsed()) return cmd_host_status(ctx, as_json);
    if (adapters->parsed()) return cmd_adapters(ctx, as_json);
    if (vm_add->parsed()) return cmd_vm_add(ctx, name, opts, as_json);
    if (vm_set->parsed()) return cmd_vm_set(ctx, name, opts, as_json);
    if (vm_list->parsed()) return cmd_vm_list(ctx, as_json);
    if (vm_show->parsed()) return cmd_vm_show(ctx, name, as_json);
    if (vm_remove->parsed()) return cmd_vm_remove(ctx, name);
    if (vm_start->parsed()) return cmd_vm_start(ctx, name, as_json);
    if (vm_reset->parsed()) return cmd_vm_reset(ctx, name, as_json);
    if (run->parsed()) {
      run_opts.sandbox = !no_sandbox;
      return cmd_run(ctx, name, command, run_opts);
    }
  } catch (const CliError& e) {
    std::cerr << "gpup: " << e.what() << "\n";
    return e.code;
  } catch (const std::exception& e) {
    std::cerr << "gpup: " << e.what() << "\n";
    return 1;
  }
  return 1;
}

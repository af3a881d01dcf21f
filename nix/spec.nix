# The translation from NixOS-style options (services.berth.*) to the spec
# berth reads (`berth schema` prints its JSON Schema).
#
# PURE: only `builtins`, no nixpkgs, nothing is built. nix/module.nix calls it
# with its option values and writes the result as JSON; the tests in
# nix/tests call it directly with Debian's nix-instantiate.
#
#   import ./spec.nix { host = { ... }; guests = { NAME = { ... }; }; }
#     -> { host = { ... }; guest = { NAME = { ... }; }; }
#
# Input: camelCase option names as in the module (maxGuests, autoStart,
# stopTimeout, readOnly, ipCmdline, cpuPinning, emulatorCpus; disks are
# { path, size, format, readOnly }), where null means "not set". Output:
# the spec's snake_case names (max_guests, autostart, stop_timeout, read_only,
# ip_cmdline, cpu_pinning, emulator_cpus; disks { path, size, format,
# readonly }) with every null dropped, and `env = {}` / `disks = []` dropped
# too, so berth applies its own defaults and the spec only says what was set.
# berth rejects unknown fields, so unknown option names are an error here as
# well (a typo fails the evaluation, not the apply).
#
# The boundary with the module: a guest's `config` (a NixOS configuration
# for the guest) needs nixpkgs to build, so it is NOT handled here. The
# module builds it first and passes the results as plain strings:
#   container: rootfs  = a directory holding the system's closure,
#              command = [ "${toplevel}/init" ]
#   vm:        kernel, initrd, cmdline = from the built system
# Passing a non-null `config` here is an error that says so.
{ host, guests ? { }, groups ? { } }:
let
  inherit (builtins)
    attrNames concatStringsSep elem filter isAttrs isList isPath listToAttrs
    mapAttrs throw toString;

  # option name -> spec field
  hostFields = {
    uplink = "uplink";
    subnet4 = "subnet4";
    subnet6 = "subnet6";
    maxGuests = "max_guests";
  };
  guestFields = {
    kind = "kind";
    index = "index";
    # containers (memory, cpus, autostart, restart, env, stop_timeout: VMs too)
    rootfs = "rootfs";
    command = "command";
    memory = "memory";
    cpus = "cpus";
    autoStart = "autostart";
    restart = "restart";
    env = "env";
    stopTimeout = "stop_timeout";
    ephemeral = "ephemeral";
    readOnly = "read_only";
    # VMs
    machine = "machine";
    accel = "accel";
    kernel = "kernel";
    initrd = "initrd";
    cmdline = "cmdline";
    ipCmdline = "ip_cmdline";
    disks = "disks";
    cdrom = "cdrom";
    firmware = "firmware";
    cpuPinning = "cpu_pinning";
    emulatorCpus = "emulator_cpus";
    exclusive = "exclusive";
    hugepages = "hugepages";
  };
  diskFields = {
    path = "path";
    size = "size";
    format = "format";
    readOnly = "readonly";
  };

  # Attributes a NixOS submodule value may carry that are not spec fields.
  # `config` is only accepted when null (see the header).
  internal = [ "_module" "config" ];

  # A path literal (./vmlinuz) becomes its absolute path as a string; it is
  # not copied into the store.
  plain = v: if isPath v then toString v else v;

  isEmpty = v: v == null || v == { } || v == [ ];

  translate = what: fields: valueOf: attrs:
    let
      names = attrNames attrs;
      unknown = filter (n: !(fields ? ${n}) && !(elem n internal)) names;
      set = filter (n: fields ? ${n} && attrs.${n} != null) names;
    in
    if !isAttrs attrs then
      throw "berth (nix/spec.nix): ${what} must be an attribute set"
    else if unknown != [ ] then
      throw "berth (nix/spec.nix): ${what}: unknown option(s) ${concatStringsSep ", " unknown}; known options: ${concatStringsSep ", " (attrNames fields)}"
    else
      listToAttrs (filter (kv: kv != null) (map
        (n:
          let v = valueOf n attrs.${n}; in
          if n == "env" && v == { } || n == "disks" && v == [ ] then null
          else { name = fields.${n}; value = v; })
        set));

  translateDisk = guest: i: d:
    translate "guest ${guest}: disks[${toString i}]" diskFields (_: plain) d;

  translateGuest = name: g:
    if isAttrs g && (g.config or null) != null then
      throw "berth (nix/spec.nix): guest ${name}: `config` is a NixOS configuration and needs nixpkgs to build; build it first and pass rootfs/command (container) or kernel/initrd/cmdline (vm) instead (nix/module.nix does this)"
    else
      translate "guest ${name}" guestFields
        (n: v:
          if n == "disks" then
            (if isList v then
              builtins.genList (i: translateDisk name i (builtins.elemAt v i)) (builtins.length v)
            else throw "berth (nix/spec.nix): guest ${name}: disks must be a list")
          else plain v)
        g;
in
if !isEmpty groups then
  throw "berth (nix/spec.nix): groups (${concatStringsSep ", " (attrNames groups)}) are not supported by this berth yet (redundancy groups: issue 6); remove services.berth.groups"
else
  {
    host = translate "host" hostFields (_: v: v) host;
    guest = mapAttrs translateGuest guests;
  }

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
#
# Groups (services.berth.groups.NAME = { replicas, indexBase, vip4, ...,
# template = { <guest options without index>, health, companions } }) become
# [group.NAME]; images (services.berth.images.NAME = { url, sha256, ... })
# become [image.NAME].
{ host, guests ? { }, groups ? { }, images ? { } }:
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
    binds = "binds";
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
    seed = "seed";
    nic = "nic";
    # any guest
    health = "health";
    nixCache = "nix_cache";
    backup = "backup";
    # group templates
    companions = "companions";
    # companions
    name = "name";
    indexBase = "index_base";
  };
  diskFields = {
    path = "path";
    image = "image";
    size = "size";
    format = "format";
    readOnly = "readonly";
  };
  bindFields = {
    source = "source";
    target = "target";
    readOnly = "read_only";
  };
  nicFields = {
    mode = "mode";
    parent = "parent";
    segment = "segment";
    pci = "pci";
    bind = "bind";
    mac = "mac";
    addr = "addr";
  };
  healthFields = {
    tcp = "tcp";
    http = "http";
    expect = "expect";
    exec = "exec";
    interval = "interval";
    timeout = "timeout";
    healthyAfter = "healthy_after";
    unhealthyAfter = "unhealthy_after";
  };
  backupFields = {
    command = "command";
    restoreCommand = "restore_command";
    recipients = "recipients";
  };
  seedFields = {
    kind = "kind";
    userData = "user_data";
    metaData = "meta_data";
    networkConfig = "network_config";
    label = "label";
    files = "files";
  };
  groupFields = {
    replicas = "replicas";
    indexBase = "index_base";
    vip4 = "vip4";
    vip6 = "vip6";
    mode = "mode";
    maxParallel = "max_parallel";
    minAvailable = "min_available";
    minHealthyTime = "min_healthy_time";
    healthyDeadline = "healthy_deadline";
    autoRevert = "auto_revert";
    drainTime = "drain_time";
    template = "template";
  };
  imageFields = {
    url = "url";
    sha256 = "sha256";
    sha256Url = "sha256_url";
    decompress = "decompress";
    extract = "extract";
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
          if n == "env" && v == { } || n == "disks" && v == [ ] || n == "companions" && v == [ ] || n == "nic" && v == [ ] || n == "binds" && v == [ ] then null
          else { name = fields.${n}; value = v; })
        set));

  # A guest's list option `field`: each element through `f index`.
  listOf = guest: field: f: v:
    if isList v then builtins.genList (i: f i (builtins.elemAt v i)) (builtins.length v)
    else throw "berth (nix/spec.nix): guest ${guest}: ${field} must be a list";

  translateDisk = guest: i: d:
    translate "guest ${guest}: disks[${toString i}]" diskFields (_: plain) d;

  translateGuest = name: g:
    if isAttrs g && (g.config or null) != null then
      throw "berth (nix/spec.nix): guest ${name}: `config` is a NixOS configuration and needs nixpkgs to build; build it first and pass rootfs/command (container) or kernel/initrd/cmdline (vm) instead (nix/module.nix does this)"
    else
      translate "guest ${name}" guestFields
        (n: v:
          if n == "disks" then listOf name n (i: translateDisk name i) v
          else if n == "companions" then
            listOf name n (i: translateGuest "${name} companions[${toString i}]") v
          else if n == "nic" then
            listOf name n (i: translate "guest ${name}: nic[${toString i}]" nicFields (_: plain)) v
          else if n == "binds" then
            listOf name n (i: translate "guest ${name}: binds[${toString i}]" bindFields (_: plain)) v
          else if n == "health" then translate "guest ${name}: health" healthFields (_: plain) v
          else if n == "backup" then translate "guest ${name}: backup" backupFields (_: plain) v
          else if n == "seed" then translate "guest ${name}: seed" seedFields (_: plain) v
          else plain v)
        g;

  translateGroup = name: g:
    translate "group ${name}" groupFields
      (n: v: if n == "template" then translateGuest "group ${name} template" v else v)
      g;
in
{
  host = translate "host" hostFields (_: v: v) host;
  guest = mapAttrs translateGuest guests;
}
// (if isEmpty groups then { } else { group = mapAttrs translateGroup groups; })
// (if isEmpty images then { } else {
  image = mapAttrs (n: translate "image ${n}" imageFields (_: v: v)) images;
})

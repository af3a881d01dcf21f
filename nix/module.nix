# NixOS module for berth: declare guests in the host configuration, get the
# berth daemon as a systemd service and an apply on every activation that
# only touches what changed (unchanged guests keep running).
#
#   services.berth = {
#     enable = true;
#     host = { uplink = "eth0"; subnet4 = "10.0.0.0/24"; };
#     guests.web = { kind = "container"; index = 2; config = { ... }; };
#   };
#
# The option -> spec translation is nix/spec.nix (pure, tested with Debian's
# nix-instantiate in crates/berth/tests/nix_module.rs). This file needs
# nixpkgs: berth's CI (no nixpkgs) only parse-checks it; with a nixpkgs
# (BERTH_NIXPKGS=/path/to/nixpkgs) the same tests evaluate it with
# lib.evalModules (nix/tests/module/eval.nix). What only a NixOS machine can
# verify is marked "NixOS-only" below and exercised by the flake's
# checks.<system>.vm-test.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption mkIf types literalExpression literalMD;
  cfg = config.services.berth;
  nullOr = types.nullOr;

  # "null = berth's default" for every optional field, so the spec only
  # carries what was set and `berth plan` shows berth's defaults.
  opt = type: description: mkOption { type = nullOr type; default = null; inherit description; };
  size = types.either types.ints.unsigned (types.strMatching "[[:space:]]*[0-9]+[[:space:]]*([kKmMgGtT]([iI]?[bB])?|[bB])?[[:space:]]*");
  cpuList = types.listOf types.ints.unsigned;

  diskType = types.submodule {
    options = {
      path = opt types.str "Absolute path of the disk (default with `image`: under the state dir).";
      image = opt types.str "Make the disk from this image (services.berth.images.NAME): a qcow2 overlay or raw copy.";
      size = opt size "Create the image (sparse) with this size when it does not exist; an existing image is never overwritten.";
      format = opt (types.enum [ "raw" "qcow2" ]) "Image format; default from the extension (.qcow2), else raw.";
      readOnly = opt types.bool "Attach read-only.";
    };
  };

  healthType = types.submodule {
    options = {
      tcp = opt types.port "Probe: TCP connect to this port of the guest's IPv4 address.";
      http = opt types.str "Probe: GET this URL, {addr} = the guest's address, e.g. \"http://{addr}:80/health\".";
      expect = opt types.ints.positive "HTTP status that counts as healthy (berth's default: 200).";
      exec = opt (types.listOf types.str) "Probe: run this command in the guest; exit 0 is healthy.";
      interval = opt types.str "Time between probes (berth's default: \"1s\").";
      timeout = opt types.str "A slower probe fails (berth's default: \"1s\").";
      healthyAfter = opt types.ints.positive "Passes in a row to become healthy (default 2).";
      unhealthyAfter = opt types.ints.positive "Failures in a row to become unhealthy (default 2).";
    };
  };
  bindType = types.submodule {
    options = {
      source = mkOption { type = types.str; description = "Host path (absolute, must exist)."; };
      target = opt types.str "Path in the container (default: `source`).";
      readOnly = opt types.bool "Mount read-only (berth's default: true).";
    };
  };
  nicType = types.submodule {
    options = {
      mode = mkOption { type = types.enum [ "macvtap" "segment" "vfio" ]; description = "macvtap on a host port, a private segment, or VFIO passthrough."; };
      parent = opt types.str "macvtap: the host interface (already up).";
      segment = opt types.str "segment: its name (guests naming the same one share an L2).";
      pci = opt types.str "vfio: the PCI address, e.g. \"0000:03:00.0\".";
      bind = opt types.bool "vfio: bind the device to vfio-pci if it is not.";
      mac = opt types.str "MAC address (default: derived from guest name and position).";
      addr = opt types.str "Containers on a segment: the address berth gives their interface.";
    };
  };
  backupType = types.submodule {
    options = {
      command = mkOption { type = types.listOf types.str; description = "Prints the configuration on stdout."; };
      restoreCommand = opt (types.listOf types.str) "Reads a configuration on stdin and installs it.";
      recipients = mkOption { type = types.listOf types.str; description = "age recipients (age1...)."; };
    };
  };

  # Options every guest, template and companion has.
  commonOptions = {
      kind = mkOption { type = types.enum [ "container" "vm" ]; description = "container (systemd-nspawn) or vm (QEMU)."; };
      health = opt healthType "Health probe (shown in `berth ps`; group members must pass it to carry the service address).";
      backup = opt backupType "Configuration backup (`berth backup`).";
      nixCache = opt types.bool "Serve the host's Nix store to the guest as a binary cache (http://<host address on its link>:5480); containers get NIX_CONFIG extra-substituters and BERTH_NIX_CACHE, VMs berth.nix_cache= on the kernel command line (berth's default: false).";
      config = mkOption {
        type = nullOr types.deferredModule;
        default = null;
        example = literalExpression "{ services.nginx.enable = true; }";
        description = ''
          A NixOS configuration for the guest, built with the host's nixpkgs.
          Container: its system closure becomes the rootfs (a store path, so
          the container is `ephemeral` unless set otherwise) and
          `''${toplevel}/init` the command. VM: its kernel, initrd and command
          line boot a microvm whose /nix/store is a read-only squashfs disk
          (as microvm.nix does). Excludes rootfs/command resp. kernel/initrd.
        '';
      };
      # containers (memory, cpus, autoStart, restart, env, stopTimeout: VMs too)
      rootfs = opt types.str "Container: root directory (absolute; needs /usr and /etc/os-release).";
      command = opt (types.listOf types.str) "Container: command; berth's default is [ \"/sbin/init\" ].";
      memory = opt size "Memory: bytes or a string like \"128M\" (1024-based).";
      cpus = opt types.number "Containers: CPU quota (e.g. 1.5); VMs: whole number of vCPUs.";
      autoStart = opt types.bool "Start on apply and at daemon start (berth's default: true).";
      restart = opt (types.enum [ "always" "on-failure" "never" ]) "Restart policy (berth's default: on-failure).";
      env = mkOption { type = types.attrsOf types.str; default = { }; description = "Environment of the guest's command."; };
      stopTimeout = opt (types.strMatching "[0-9]+(ms|s|m|h)") "How long a stop waits before killing, e.g. \"10s\" (berth's default).";
      ephemeral = opt types.bool "Container: throw-away overlay over the rootfs.";
      readOnly = opt types.bool "Container: read-only rootfs.";
      binds = mkOption {
        type = types.listOf bindType;
        default = [ ];
        example = literalExpression ''[ { source = "/srv/web"; target = "/var/www"; readOnly = false; } ]'';
        description = "Container: host paths mounted into the container (with `config`: after the host's /nix/store, which is always bound read-only).";
      };
      # VMs
      machine = opt (types.enum [ "microvm" "q35" ]) "VM: machine type (berth's default: microvm).";
      accel = opt (types.enum [ "auto" "kvm" "tcg" ]) "VM: accelerator (berth's default: auto).";
      kernel = opt types.str "VM: kernel image for a direct boot.";
      initrd = opt types.str "VM: initramfs for a direct boot.";
      cmdline = opt types.str "VM: kernel command line (with `config`: appended to the built system's).";
      ipCmdline = opt types.bool "VM: append ip=... (and berth.ip6/gw6) to the command line (berth's default: true).";
      disks = mkOption { type = types.listOf diskType; default = [ ]; description = "VM: disks."; };
      nic = mkOption { type = types.listOf nicType; default = [ ]; description = "Extra NICs after the routed management link (eth1, eth2, ...)."; };
      seed = opt (types.attrsOf types.anything) "VM: pre-seeded volume, { kind = \"nocloud\"; userData = ...; } or { kind = \"files\"; label = \"CONFIG\"; files = { ... }; }.";
      cdrom = opt types.str "VM (q35): ISO image attached as a CD-ROM.";
      firmware = opt (types.enum [ "bios" "uefi" ]) "VM (q35): firmware.";
      cpuPinning = opt cpuList "VM: host CPUs for the vCPU threads.";
      emulatorCpus = opt cpuList "VM: host CPUs for QEMU's other threads.";
      exclusive = opt types.bool "VM: no other pinned VM may share the pinned CPUs.";
      hugepages = opt types.bool "VM: back memory with 2 MiB hugepages.";
  };

  guestType = types.submodule {
    options = commonOptions // {
      index = mkOption {
        type = types.ints.positive;
        description = "Picks the guest's addresses and link (vb<index>); 1..maxGuests-1, unique.";
      };
    };
  };
  # Templates and companions take rootfs/command (container) or
  # kernel/initrd (VM) as paths; building them from `config` is for guests,
  # so they have no `config` option (setting one is an unknown-option error
  # instead of being silently dropped).
  memberOptions = removeAttrs commonOptions [ "config" ];
  companionType = types.submodule {
    options = memberOptions // {
      name = mkOption { type = types.str; description = "Member web-0's companion db is web-0-db."; };
      indexBase = mkOption { type = types.ints.positive; description = "Member i's companion gets index indexBase + i."; };
    };
  };
  templateType = types.submodule {
    options = memberOptions // {
      companions = mkOption { type = types.listOf companionType; default = [ ]; description = "Containers started with each member and tied to its life."; };
    };
  };
  groupType = types.submodule {
    options = {
      replicas = mkOption { type = types.ints.unsigned; description = "Number of members NAME-0 .. NAME-(replicas-1)."; };
      indexBase = mkOption { type = types.ints.positive; description = "Member i gets index indexBase + i."; };
      vip4 = opt types.str "IPv4 service address (outside host.subnet4).";
      vip6 = opt types.str "IPv6 service address (outside host.subnet6).";
      mode = opt (types.enum [ "active" "ecmp" ]) "active (default) or ecmp.";
      maxParallel = opt types.ints.positive "Members updated at once (default 1).";
      minAvailable = opt types.ints.unsigned "Healthy members an update never goes below.";
      minHealthyTime = opt types.str "An updated member must stay healthy this long (default \"1s\").";
      healthyDeadline = opt types.str "... within this (default \"60s\").";
      autoRevert = opt types.bool "Revert a failed update (default true).";
      drainTime = opt types.str "Requests in flight finish before a member stops (default \"500ms\").";
      template = mkOption { type = templateType; description = "The guest every member is made from (no index)."; };
    };
  };
  imageType = types.submodule {
    options = {
      url = mkOption { type = types.str; description = "https://, http:// or file:///absolute/path."; };
      sha256 = opt types.str "SHA-256 of the file as downloaded.";
      sha256Url = opt types.str "A checksum file listing the file (instead of sha256).";
      decompress = opt (types.enum [ "auto" "gz" "bz2" "xz" "zstd" "none" ]) "Decompression (default auto).";
      extract = opt types.str "Take one file out of an ISO: \"iso:/path/inside\".";
    };
  };

  # --- guests declared with `config` (NixOS-only: needs nixpkgs to build) ---

  evalGuest = name: modules: import "${pkgs.path}/nixos/lib/eval-config.nix" {
    # As nixos-containers do: the guest gets the host's platform and nixpkgs.
    system = null;
    modules = modules ++ [{
      nixpkgs.hostPlatform = lib.mkDefault pkgs.stdenv.hostPlatform;
      networking.hostName = lib.mkDefault name;
      # berth configures the link from the host (container) or the kernel
      # command line (VM); nothing in the guest should run DHCP on it.
      networking.useDHCP = lib.mkDefault false;
      system.stateVersion = lib.mkDefault config.system.stateVersion;
    }];
  };

  # Container: as nixos-containers do, the host's /nix/store is bound into
  # the container read-only (`binds`) and the rootfs is a tiny store path:
  # what systemd-nspawn wants to see (/usr, /etc/os-release), /sbin/init and
  # an empty /nix/store to mount on. It is read-only, hence ephemeral by
  # default: writes go to a tmpfs overlay, and with --private-users nspawn
  # chowns only this tiny tree, not a whole closure (overlayfs cannot be
  # id-mapped on most kernels, so an overlay over a copy of the closure
  # meant copying all of it into memory at every start).
  containerSystem = name: g: evalGuest name [ g.config { boot.isContainer = true; } ];
  containerRootfs = name: toplevel:
    pkgs.runCommand "berth-rootfs-${name}" { } ''
      mkdir -p $out/usr $out/etc $out/sbin $out/nix/store $out/nix/var/nix
      cp -L ${toplevel}/etc/os-release $out/etc/os-release
      ln -s ${toplevel}/init $out/sbin/init
    '';
  storeBind = { source = "/nix/store"; target = "/nix/store"; readOnly = true; };

  # VM: a microvm booting the system's kernel and initrd; / is a tmpfs,
  # /nix/store a read-only squashfs image of the closure attached as the
  # first disk (/dev/vda); the guest takes its addresses from the ip= and
  # berth.ip6=/berth.gw6= parameters berth appends to the command line.
  vmProfile = { modulesPath, pkgs, ... }: {
    imports = [ "${modulesPath}/profiles/qemu-guest.nix" ];
    boot.loader.grub.enable = false;
    boot.initrd.availableKernelModules = [ "virtio_mmio" "virtio_blk" "virtio_net" "squashfs" ];
    # Loaded, not only available: a microvm's virtio-mmio devices are named
    # on the kernel command line (virtio_mmio.device=...), which udev cannot
    # match a module to, and the store disk is needed before stage 2.
    boot.initrd.kernelModules = [ "virtio_mmio" "virtio_blk" "squashfs" ];
    boot.kernelParams = [ "console=ttyS0" ];
    fileSystems."/" = lib.mkDefault { device = "tmpfs"; fsType = "tmpfs"; options = [ "mode=0755" ]; };
    fileSystems."/nix/store" = { device = "/dev/vda"; fsType = "squashfs"; options = [ "ro" ]; neededForBoot = true; };
    nix.enable = lib.mkDefault false; # the store is read-only
    networking.usePredictableInterfaceNames = lib.mkDefault false; # eth0, as in berth's ip=
    systemd.services.berth-network = {
      description = "Guest addresses from berth's kernel command line";
      wantedBy = [ "multi-user.target" ];
      before = [ "network.target" ];
      bindsTo = [ "sys-subsystem-net-devices-eth0.device" ];
      after = [ "sys-subsystem-net-devices-eth0.device" ];
      path = [ pkgs.iproute2 ];
      serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
      script = builtins.readFile ./guest-network.sh;
    };
  };
  vmSystem = name: g: evalGuest name [ g.config vmProfile ];
  storeImage = name: toplevel: pkgs.callPackage "${pkgs.path}/nixos/lib/make-squashfs.nix" {
    fileName = "berth-store-${name}";
    storeContents = [ toplevel ];
  };

  # What spec.nix gets for one guest: the options as set, with `config`
  # replaced by the paths of the built system.
  resolve = name: g:
    let
      base = removeAttrs g [ "config" "_module" ];
      orDefault = v: d: if v == null then d else v;
    in
    if g.config == null then base
    else if g.kind == "container" then
      let top = (containerSystem name g).config.system.build.toplevel; in
      base // {
        rootfs = "${containerRootfs name top}";
        command = [ "${top}/init" ];
        ephemeral = orDefault g.ephemeral true;
        binds = [ storeBind ] ++ g.binds;
      }
    else
      let
        sys = (vmSystem name g).config;
        top = sys.system.build.toplevel;
      in
      base // {
        kernel = "${sys.system.build.kernel}/${sys.system.boot.loader.kernelFile}";
        initrd = "${sys.system.build.initialRamdisk}/${sys.system.boot.loader.initrdFile}";
        cmdline = lib.concatStringsSep " " ([ "init=${top}/init" ] ++ sys.boot.kernelParams
          ++ lib.optional (g.cmdline != null) g.cmdline);
        disks = [{ path = "${storeImage name top}"; format = "raw"; readOnly = true; size = null; image = null; }] ++ g.disks;
      };

  spec = import ./spec.nix {
    host = { inherit (cfg.host) uplink subnet4 subnet6 maxGuests; };
    guests = lib.mapAttrs resolve cfg.guests;
    groups = cfg.groups;
    images = cfg.images;
  };
  specFile = pkgs.writeText "berth-spec.json" (builtins.toJSON spec);

  environment = { BERTH_STATE_DIR = cfg.stateDir; BERTH_SOCKET = cfg.socket; };
in
{
  options.services.berth = {
    enable = mkEnableOption "berth, declarative VMs and containers";
    package = mkOption {
      type = types.package;
      default = pkgs.berth or (throw "services.berth.package is not set: use the berth flake's nixosModules.default (which sets it) or set it to berth's package");
      defaultText = literalMD "`pkgs.berth` (the flake's `nixosModules.default` sets the flake's package)";
      description = "The berth package.";
    };
    stateDir = mkOption { type = types.path; default = "/var/lib/berth"; description = "State directory (store, guest files)."; };
    socket = mkOption { type = types.path; default = "/run/berth/berth.sock"; description = "The daemon's API socket."; };
    host = {
      uplink = mkOption { type = types.str; example = "eth0"; description = "Interface NAT goes out of."; };
      subnet4 = mkOption { type = types.str; example = "10.0.0.0/24"; description = "IPv4 network for guest links (guest i gets network + i)."; };
      subnet6 = opt types.str "Optional IPv6 network, e.g. \"fd42:b:e:1::/64\".";
      maxGuests = opt types.ints.positive "Most guests on this host (berth's default: 64).";
    };
    guests = mkOption {
      type = types.attrsOf guestType;
      default = { };
      description = "Guests by name (1-32 characters of a-z, 0-9, -).";
    };
    groups = mkOption {
      type = types.attrsOf groupType;
      default = { };
      description = "Redundancy groups: replicas identical members behind a health-checked service address, updated one by one without downtime.";
    };
    images = mkOption {
      type = types.attrsOf imageType;
      default = { };
      description = "Images berth downloads and verifies; guests use them as \"image:NAME\".";
    };
    specFile = mkOption {
      type = types.path;
      readOnly = true;
      default = specFile;
      defaultText = literalMD "`berth-spec.json` in the store";
      description = "The generated spec (read-only), e.g. for `berth plan`.";
    };
  };

  config = mkIf cfg.enable {
    assertions = lib.concatLists (lib.mapAttrsToList (name: g: [
      {
        assertion = g.config == null || (if g.kind == "container" then g.rootfs == null && g.command == null else g.kernel == null && g.initrd == null);
        message = "services.berth.guests.${name}: `config` builds the guest; leave ${if g.kind == "container" then "rootfs and command" else "kernel and initrd"} unset";
      }
      {
        assertion = !(g.config != null && g.kind == "container" && g.ephemeral == false && g.readOnly != true);
        message = "services.berth.guests.${name}: a container built from `config` has its rootfs in the read-only Nix store; it must be ephemeral or readOnly";
      }
    ]) cfg.guests);

    environment.systemPackages = [ cfg.package ];

    # QEMU drops to this user (-runas); berth would useradd it elsewhere.
    users.users.berth-qemu = {
      isSystemUser = true;
      group = "berth-qemu";
      extraGroups = [ "kvm" ];
      description = "berth QEMU (unprivileged)";
    };
    users.groups.berth-qemu = { };

    systemd.services.berth = {
      description = "berth daemon (declarative VMs and containers)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      inherit environment;
      # nix-store: serving the host's store to guests with `nixCache`.
      path = [ config.nix.package ];
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/berth daemon";
        # The daemon sends READY=1 once it serves the API.
        Type = "notify";
        NotifyAccess = "main";
        # Guests' supervisors (berth shim) are detached from the daemon and
        # must survive its restart (package update, crash): only the main
        # process is killed; a new daemon re-adopts the running guests.
        KillMode = "process";
        # No Delegate=: every guest lives in a scope of its own
        # (machine.slice/berth-<guest>.scope, made by its supervisor with
        # systemd-run), so a restart of this unit cannot touch guests and
        # systemd never starts the daemon into a cgroup berth changed.
        Restart = "always";
        RestartSec = "1s";
        TasksMax = "infinity";
        LimitNOFILE = 1048576;
        # No ProtectSystem/PrivateTmp/... : berth creates namespaces, mounts
        # (systemd-nspawn), links, routes and nftables rules as root.
        # Tightening this needs testing on a NixOS machine (NixOS-only).
      };
    };

    # Activation applies the new spec: restartTriggers make this unit run
    # again only when the spec changes, and `berth apply` only touches the
    # guests whose config changed (NixOS-only to verify end to end).
    systemd.services.berth-apply = {
      description = "berth: apply the declared guests";
      wantedBy = [ "multi-user.target" ];
      requires = [ "berth.service" ];
      after = [ "berth.service" ];
      restartTriggers = [ specFile ];
      inherit environment;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${cfg.package}/bin/berth apply --yes ${specFile}";
      };
    };
  };
}

# nix/module.nix evaluated with nixpkgs' module system (lib.evalModules),
# not only parse-checked: option types, unknown options, assertions, the
# units and the spec file the module writes. Run by
# crates/berth/tests/nix_module.rs when a nixpkgs is available:
#
#   nix-instantiate --eval --strict --json nix/tests/module/eval.nix \
#     --argstr nixpkgs /path/to/nixpkgs --argstr root /tmp/x -A host
#
# Only `${nixpkgs}/lib` is needed for everything but `nixos` (a full
# nixpkgs; evaluated, never built). NixOS itself is not loaded: `nixosStub`
# declares the NixOS options the module sets, with the types NixOS gives
# them, so a definition NixOS would reject fails here too; `pkgs` is a stub
# of fake derivations (nothing is built or written to the store).
#
# Attributes:
#   cases.<case>   the spec the module writes for the options of
#                  nix/tests/<case>.nix (read back from the spec file); the
#                  test compares it with nix/tests/expected/<case>.json
#   host           a host with a container, a VM, a group and images: units,
#                  spec, and the same options through nix/spec.nix directly
#   configGuests   a container and a VM declared with `config`, built with
#                  stand-ins for nixos/lib/eval-config.nix and the builders
#                  (the guest modules, berth's VM profile included, are
#                  evaluated and type-checked; the outputs are fake paths)
#   flake          flake.nix's nixosModules.default and .berth
#   disabled       enable = false with guests declared: nothing is defined
#   badExpect      { <name> = "text the error must contain"; }
#   bad.<name>     an evaluation that must fail with that text
#   assertions     the failed assertion messages of a misconfigured host
#   docs           the option documentation as NixOS renders it
#   nixos          (full nixpkgs only) a real NixOS system importing the
#                  module, with guests built from `config`
{ nixpkgs, root ? "/nonexistent" }:
let
  lib = import "${nixpkgs}/lib";
  inherit (lib) mkOption types;

  # The NixOS options nix/module.nix (and its VM profile) defines, typed as
  # NixOS types them (nixos/modules/misc/assertions.nix,
  # config/system-path.nix, config/users-groups.nix, lib/systemd-unit-options.nix,
  # misc/version.nix, tasks/filesystems.nix, ...), reduced to the
  # sub-options the module uses: anything else it set would be an unknown
  # option here.
  unitName = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";
  unitValueType = types.mkOptionType {
    name = "systemd option";
    check = v: builtins.isString v || builtins.isInt v || builtins.isBool v || builtins.isPath v || lib.isDerivation v;
    merge = lib.mergeEqualOption;
  };
  # NixOS: attrsOf unitOption, and checkService's checks of Type and Restart.
  serviceConfigType = types.addCheck (types.attrsOf (types.either (types.listOf unitValueType) unitValueType)) (c:
    lib.elem (c.Type or "simple") [ "exec" "simple" "forking" "oneshot" "dbus" "notify" "notify-reload" "idle" ]
    && lib.elem (c.Restart or "no") [ "no" "on-success" "on-failure" "on-abnormal" "on-abort" "always" ]);
  serviceType = types.submodule {
    options = {
      description = mkOption { type = types.singleLineStr; default = ""; };
      wantedBy = mkOption { type = types.listOf unitName; default = [ ]; };
      requiredBy = mkOption { type = types.listOf unitName; default = [ ]; };
      wants = mkOption { type = types.listOf unitName; default = [ ]; };
      requires = mkOption { type = types.listOf unitName; default = [ ]; };
      after = mkOption { type = types.listOf unitName; default = [ ]; };
      before = mkOption { type = types.listOf unitName; default = [ ]; };
      bindsTo = mkOption { type = types.listOf unitName; default = [ ]; };
      restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      environment = mkOption {
        type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]));
        default = { };
      };
      path = mkOption { type = types.listOf (types.oneOf [ types.package types.str ]); default = [ ]; };
      script = mkOption { type = types.lines; default = ""; };
      serviceConfig = mkOption { type = serviceConfigType; default = { }; };
    };
  };
  nixosStub = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
      users.users = mkOption {
        type = types.attrsOf (types.submodule {
          options = {
            isSystemUser = mkOption { type = types.bool; default = false; };
            group = mkOption { type = types.str; default = ""; };
            extraGroups = mkOption { type = types.listOf types.str; default = [ ]; };
            description = mkOption { type = types.str; default = ""; };
          };
        });
        default = { };
      };
      users.groups = mkOption {
        type = types.attrsOf (types.submodule {
          options.gid = mkOption { type = types.nullOr types.int; default = null; };
        });
        default = { };
      };
      systemd.services = mkOption { type = types.attrsOf serviceType; default = { }; };
      system.stateVersion = mkOption { type = types.str; default = "25.05"; };
      nix.package = mkOption { type = types.package; default = fakePackage "nix-stub" "nix"; };
    };
  };

  # Fake derivations: a store-path-shaped outPath, nothing behind it.
  fakePackage = name: hashOf: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" hashOf)}-${name}";
  };
  stubThrow = n: throw "nix/tests/module/eval.nix: pkgs.${n} is a stub; building guests from `config` needs nixpkgs (see `nixos`)";
  # What the module takes from pkgs without a `config` guest. writeText
  # keeps its `text`, as nixpkgs' writeText does, so the spec can be read.
  pkgsStub = {
    writeText = name: text: fakePackage name text // { inherit text; };
    berth = fakePackage "berth-stub" "berth";
  } // lib.genAttrs [ "path" "stdenv" "runCommand" "closureInfo" "callPackage" ] stubThrow;

  eval = pkgs: module: config: lib.evalModules {
    modules = [
      module
      nixosStub
      { _module.args.pkgs = pkgs; }
      config
    ];
  };
  evalWith = eval pkgsStub ../../module.nix;

  # Everything the module defines, forced: type errors, unknown options and
  # throws surface here, as they would in a NixOS build.
  force = config: builtins.deepSeq config true;

  specOf = config: builtins.fromJSON config.services.berth.specFile.text;

  services = args: {
    services.berth = { enable = true; } // args;
  };

  # The arguments a nix/tests case passes to nix/spec.nix, taken by
  # evaluating the case with an `import` that hands them back.
  caseArgs = file: builtins.scopedImport {
    import = p: if p == ../../spec.nix then (args: args) else import p;
  } file { inherit root; };

  caseFiles = lib.filterAttrs
    (n: t: t == "regular" && lib.hasSuffix ".nix" n && !lib.hasPrefix "bad-" n
      && builtins.pathExists (../expected + "/${lib.removeSuffix ".nix" n}.json"))
    (builtins.readDir ./..);

  cases = lib.mapAttrs'
    (n: _: lib.nameValuePair (lib.removeSuffix ".nix" n)
      (specOf (evalWith (services (caseArgs (./.. + "/${n}")))).config))
    caseFiles;

  # A container and a VM with every kind of nested option, a group with a
  # template and a companion, an image.
  hostArgs = {
    host = { uplink = "eth0"; subnet4 = "10.0.0.0/24"; subnet6 = "fd42:b:e:1::/64"; maxGuests = 32; };
    guests.web = {
      kind = "container";
      index = 2;
      rootfs = "${root}/rootfs";
      command = [ "/sbin/init" ];
      memory = "512M";
      cpus = 1.5;
      env = { GREETING = "hello"; };
      stopTimeout = "10s";
      ephemeral = true;
      nixCache = true;
      health = { tcp = 80; interval = "500ms"; };
      backup = { command = [ "cat" "/etc/os-release" ]; recipients = [ "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p" ]; };
      nic = [{ mode = "segment"; segment = "sync"; addr = "192.168.7.2/24"; }];
    };
    guests.router = {
      kind = "vm";
      index = 3;
      kernel = "${root}/vmlinuz";
      initrd = "${root}/initrd.img";
      cmdline = "console=ttyS0";
      memory = 536870912;
      cpus = 2;
      cpuPinning = [ 0 ];
      disks = [
        { image = "debian"; size = "8G"; }
        { path = "${root}/seed.img"; format = "raw"; readOnly = true; }
      ];
      nic = [{ mode = "segment"; segment = "sync"; mac = "52:54:00:12:34:01"; }];
      seed = { kind = "nocloud"; userData = "#cloud-config\n"; };
      health.exec = [ "true" ];
    };
    groups.edge = {
      replicas = 2;
      indexBase = 10;
      vip4 = "10.0.1.10";
      maxParallel = 1;
      template = {
        kind = "container";
        rootfs = "${root}/rootfs";
        ephemeral = true;
        health = { http = "http://{addr}:80/"; expect = 200; };
        companions = [{ name = "db"; indexBase = 20; kind = "container"; rootfs = "${root}/rootfs"; readOnly = true; }];
      };
    };
    images.debian = { url = "file:///var/lib/images/debian.qcow2"; sha256 = "0000000000000000000000000000000000000000000000000000000000000000"; };
  };

  failedAssertions = c: map (a: a.message) (builtins.filter (a: !a.assertion) c.assertions);

  host =
    let
      c = (evalWith (services hostArgs)).config;
      units = c.systemd.services;
    in
    assert force c;
    {
      spec = specOf c;
      pure = import ../../spec.nix hostArgs;
      specFile = "${c.services.berth.specFile}";
      berth = {
        inherit (units.berth) wantedBy wants after environment serviceConfig;
      };
      apply = {
        inherit (units.berth-apply) wantedBy requires after environment serviceConfig;
        restartTriggers = map toString units.berth-apply.restartTriggers;
      };
      systemPackages = map (p: p.name) c.environment.systemPackages;
      qemuUser = c.users.users.berth-qemu;
      groups = builtins.attrNames c.users.groups;
      failedAssertions = failedAssertions c;
      inherit (c) warnings;
    };

  # Guests from `config`: module.nix's `import "${pkgs.path}/nixos/lib/eval-config.nix"`
  # gets `evalConfig` below (the guest modules evaluated with the same NixOS
  # stubs plus the guest-side options berth sets), the builders give fake
  # derivations named as the real ones would be.
  stubPath = "/berth-test-stub-nixpkgs";
  guestStub = { config, ... }: {
    imports = [ nixosStub ];
    options = {
      nixpkgs.hostPlatform = mkOption { type = types.either types.str types.attrs; };
      networking.hostName = mkOption { type = types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$"; };
      networking.useDHCP = mkOption { type = types.bool; default = true; };
      networking.usePredictableInterfaceNames = mkOption { type = types.bool; default = true; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      boot.isContainer = mkOption { type = types.bool; default = false; };
      boot.loader.grub.enable = mkOption { type = types.bool; default = true; };
      boot.initrd.availableKernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
      boot.initrd.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
      boot.kernelParams = mkOption { type = types.listOf types.str; default = [ ]; };
      fileSystems = mkOption {
        type = types.attrsOf (types.submodule {
          options = {
            device = mkOption { type = types.nullOr types.nonEmptyStr; default = null; };
            fsType = mkOption { type = types.nonEmptyStr; default = "auto"; };
            options = mkOption { type = types.nonEmptyListOf types.nonEmptyStr; default = [ "defaults" ]; };
            neededForBoot = mkOption { type = types.bool; default = false; };
          };
        });
        default = { };
      };
      nix.enable = mkOption { type = types.bool; default = true; };
      system.boot.loader.kernelFile = mkOption { type = types.str; default = "bzImage"; };
      system.boot.loader.initrdFile = mkOption { type = types.str; default = "initrd"; };
      system.build = mkOption { type = types.lazyAttrsOf types.unspecified; default = { }; };
    };
    config = {
      _module.args.pkgs = { iproute2 = fakePackage "iproute2" "iproute2"; };
      system.build =
        let
          # Changes with the guest's configuration, as the real one does.
          id = builtins.toJSON (removeAttrs config [ "_module" "system" "nixpkgs" ]);
        in
        {
          toplevel = fakePackage "nixos-system-${config.networking.hostName}" id;
          kernel = fakePackage "linux" "linux";
          initialRamdisk = fakePackage "initrd-linux" id;
        };
    };
  };
  evalConfig = { system ? null, modules, ... }:
    let
      e = lib.evalModules {
        modules = modules ++ [ guestStub ];
        specialArgs.modulesPath = toString ./stub-nixos-modules;
      };
    in
    assert force e.config;
    e;
  pkgsWithGuests = pkgsStub // {
    path = stubPath;
    stdenv.hostPlatform = { system = "x86_64-linux"; };
    runCommand = name: env: script: fakePackage name (builtins.toJSON env + script);
    closureInfo = { rootPaths }: fakePackage "closure-info" (toString rootPaths);
    callPackage = f: args:
      if f == "${stubPath}/nixos/lib/make-squashfs.nix" then fakePackage "${args.fileName}.img" (toString args.storeContents)
      else stubThrow "callPackage ${f}";
  };
  moduleWithGuests = {
    _file = toString ../../module.nix;
    imports = [
      (builtins.scopedImport {
        import = p: if p == "${stubPath}/nixos/lib/eval-config.nix" then evalConfig else import p;
      } ../../module.nix)
    ];
  };
  configGuests =
    let
      e = eval pkgsWithGuests moduleWithGuests (services {
        host = { uplink = "eth0"; subnet4 = "10.0.0.0/24"; };
        guests.web = {
          kind = "container";
          index = 2;
          memory = "512M";
          config = { networking.firewall.allowedTCPPorts = [ 80 ]; };
        };
        guests.micro = {
          kind = "vm";
          index = 3;
          cmdline = "quiet";
          disks = [{ path = "/var/lib/berth/disks/data.img"; size = "1G"; }];
          config = { config, ... }: { networking.hostName = "micro-vm"; };
        };
      });
      c = e.config;
    in
    assert force c;
    {
      spec = specOf c;
      failedAssertions = failedAssertions c;
    };

  # The flake's modules: nixosModules.default sets the package to the
  # flake's build (self.packages.<system>.default), nixosModules.berth is
  # the bare module. Only these outputs are taken (the rest needs nixpkgs).
  flake =
    let
      berthPackage = fakePackage "berth-0.1.0" "flake";
      outputs = (import ../../../flake.nix).outputs {
        self = { packages.x86_64-linux.default = berthPackage; };
        nixpkgs = { inherit lib; };
      };
      pkgs = removeAttrs pkgsStub [ "berth" ] // { stdenv.hostPlatform.system = "x86_64-linux"; };
      evalModule = m: (eval pkgs m (services minimal)).config;
      c = evalModule outputs.nixosModules.default;
      bare = evalModule outputs.nixosModules.berth;
    in
    assert force c;
    {
      execStart = c.systemd.services.berth.serviceConfig.ExecStart;
      package = c.services.berth.package.name;
      bareSpec = specOf bare;
    };

  disabled =
    let
      c = (evalWith {
        services.berth = { enable = false; } // hostArgs;
      }).config;
    in
    assert force c;
    {
      units = builtins.attrNames c.systemd.services;
      inherit (c) assertions;
      systemPackages = c.environment.systemPackages;
    };

  minimal = {
    host = { uplink = "eth0"; subnet4 = "10.0.0.0/24"; };
    guests.web = { kind = "container"; index = 2; rootfs = "/var/lib/berth/rootfs/web"; };
  };
  withGuest = g: minimal // { guests.web = minimal.guests.web // g; };
  notOfType = option: "A definition for option `${option}' is not of type";
  badCases = {
    index_string = {
      expect = "${notOfType "services.berth.guests.web.index"} `positive integer";
      args = withGuest { index = "two"; };
    };
    index_zero = {
      expect = notOfType "services.berth.guests.web.index";
      args = withGuest { index = 0; };
    };
    kind_unknown = {
      expect = "${notOfType "services.berth.guests.web.kind"} `one of \"container\", \"vm\"'";
      args = withGuest { kind = "lxc"; };
    };
    memory_bool = {
      expect = notOfType "services.berth.guests.web.memory";
      args = withGuest { memory = true; };
    };
    memory_garbage = {
      expect = notOfType "services.berth.guests.web.memory";
      args = withGuest { memory = "lots"; };
    };
    stop_timeout_unit = {
      expect = notOfType "services.berth.guests.web.stopTimeout";
      args = withGuest { stopTimeout = "10"; };
    };
    unknown_option = {
      expect = "The option `services.berth.guests.web.cpu' does not exist";
      args = withGuest { cpu = 2; };
    };
    snake_case_option = {
      expect = "The option `services.berth.guests.web.autostart' does not exist";
      args = withGuest { autostart = false; };
    };
    health_port = {
      expect = notOfType "services.berth.guests.web.health.tcp";
      args = withGuest { health.tcp = 70000; };
    };
    disk_format = {
      expect = "format' is not of type `null or one of \"raw\", \"qcow2\"'";
      args = withGuest { kind = "vm"; rootfs = null; kernel = "/boot/vmlinuz"; disks = [{ path = "/d.img"; format = "vmdk"; }]; };
    };
    nic_mode_missing = {
      expect = "mode' was accessed but has no value defined";
      args = withGuest { nic = [{ segment = "sync"; }]; };
    };
    replicas_negative = {
      expect = "${notOfType "services.berth.groups.g.replicas"} `unsigned integer";
      args = minimal // {
        groups.g = { replicas = -1; indexBase = 10; template = { kind = "container"; rootfs = "/r"; }; };
      };
    };
    group_unknown_option = {
      expect = "The option `services.berth.groups.g.members' does not exist";
      args = minimal // {
        groups.g = { replicas = 2; indexBase = 10; members = [ "a" ]; template = { kind = "container"; rootfs = "/r"; }; };
      };
    };
    template_index = {
      expect = "The option `services.berth.groups.g.template.index' does not exist";
      args = minimal // {
        groups.g = { replicas = 2; indexBase = 10; template = { kind = "container"; rootfs = "/r"; index = 3; }; };
      };
    };
    companion_index_base = {
      expect = "indexBase' is not of type `positive integer";
      args = minimal // {
        groups.g = {
          replicas = 2;
          indexBase = 10;
          template = { kind = "container"; rootfs = "/r"; companions = [{ name = "db"; kind = "container"; indexBase = 0; rootfs = "/r"; }]; };
        };
      };
    };
    # `config` builds single guests only: a template's or companion's would
    # not be built (nix/module.nix used to drop it silently).
    template_config = {
      expect = "The option `services.berth.groups.g.template.config' does not exist";
      args = minimal // {
        groups.g = { replicas = 1; indexBase = 10; template = { kind = "container"; config = { }; }; };
      };
    };
    companion_config = {
      expect = "config' does not exist";
      args = minimal // {
        groups.g = {
          replicas = 1;
          indexBase = 10;
          template = { kind = "container"; rootfs = "/r"; companions = [{ name = "db"; kind = "container"; indexBase = 20; config = { }; }]; };
        };
      };
    };
    image_decompress = {
      expect = notOfType "services.berth.images.debian.decompress";
      args = minimal // { images.debian = { url = "https://example.org/d.qcow2"; decompress = "rar"; }; };
    };
    host_uplink_missing = {
      expect = "The option `services.berth.host.uplink' was accessed but has no value defined";
      args = { host.subnet4 = "10.0.0.0/24"; };
    };
  };
  bad = lib.mapAttrs (_: b: force (evalWith (services b.args)).config) badCases // {
    # Without the flake's nixosModules.default nothing sets the package.
    package_unset = force (eval (removeAttrs pkgsStub [ "berth" ]) ../../module.nix (services minimal)).config;
  };
  badExpect = lib.mapAttrs (_: b: b.expect) badCases // {
    package_unset = "services.berth.package is not set";
  };

  # As NixOS does with config.assertions: the failed ones' messages.
  assertions = failedAssertions (evalWith (services {
    host = minimal.host;
    guests.web = { kind = "container"; index = 2; rootfs = "/r"; config = { services.nginx.enable = true; }; };
    guests.vm = { kind = "vm"; index = 3; kernel = "/boot/vmlinuz"; config = { }; };
    guests.rw = { kind = "container"; index = 4; ephemeral = false; config = { }; };
    guests.ok = { kind = "container"; index = 5; config = { }; readOnly = true; ephemeral = false; };
  })).config;

  # The option documentation NixOS renders (nixos-render-docs; the manual
  # with documentation.nixos.includeAllModules): every visible option under
  # services.berth with its type, description, default and example (values
  # rendered as Nix code, as NixOS does; a literalExpression must be Nix).
  docs =
    map
      (o: {
        inherit (o) name type description;
        # { kind = "literalExpression" (Nix code) or "literalMD"; text; }
        default = if o ? default then { kind = o.default._type; inherit (o.default) text; } else null;
        example = if o ? example then { kind = o.example._type; inherit (o.example) text; } else null;
      })
      (builtins.filter (o: !o.internal && o.visible)
        (lib.optionAttrSetToDocList (evalWith { }).options.services.berth));

  # Full nixpkgs only (`nixos/lib/eval-config.nix`): a NixOS system with the
  # module and guests built from `config`. Evaluation only: forcing the
  # .drvPath instantiates the derivations (writes .drv files), builds nothing.
  nixos =
    let
      system = import "${nixpkgs}/nixos/lib/eval-config.nix" {
        system = "x86_64-linux";
        modules = [
          ../../module.nix
          ({ pkgs, ... }: {
            boot.isContainer = true;
            system.stateVersion = "25.05";
            services.berth = {
              enable = true;
              package = pkgs.writeShellScriptBin "berth" "exit 0";
              host = { uplink = "eth0"; subnet4 = "10.0.0.0/24"; };
              guests.web = { kind = "container"; index = 2; config = { services.nginx.enable = true; }; };
              guests.micro = { kind = "vm"; index = 3; cmdline = "quiet"; config = { }; };
            };
          })
        ];
      };
      c = system.config;
      failed = failedAssertions c;
    in
    assert failed == [ ] || throw "failed assertions: ${toString failed}";
    {
      specDrv = c.services.berth.specFile.drvPath;
      toplevelDrv = c.system.build.toplevel.drvPath;
      spec = builtins.fromJSON (builtins.unsafeDiscardStringContext c.services.berth.specFile.text);
    };
in
{
  inherit cases host configGuests flake disabled bad badExpect assertions docs nixos;
}

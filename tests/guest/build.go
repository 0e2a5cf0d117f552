// Package guest builds and boots a tiny Linux guest under QEMU for end-to-end
// tests of vhost-user-blk backends (blockbackend and qemu-storage-daemon).
//
// Build makes a kit from Debian packages fetched with `apt-get download` (no
// root needed, nothing installed): the cloud kernel
// (linux-image-<abi>-cloud-amd64-unsigned, or the signed image if the
// unsigned one is not in the archive), the virtio modules it needs for a
// virtio-blk PCI disk, and busybox-static (a shell for the "sh" command and
// for debugging). It adds a static Go agent (./agent, built with
// CGO_ENABLED=0) as /init, and writes an uncompressed newc cpio initramfs
// with an archive writer of its own. Everything is cached in a directory and
// reused while the package versions stay the same.
//
// Modules: Debian 12 ships them uncompressed; newer kernels ship .ko.xz or
// .ko.zst. Build decompresses them on the host (with the xz or zstd
// program, gzip in Go) so that the agent can always call init_module(2) on
// a plain ELF image, whatever the guest kernel's own decompression support.
// The load order comes from each module's .modinfo "depends=" field.
//
// Boot starts qemu-system-x86_64 with TCG (nested KVM hangs on the machines
// this was written for), shared guest memory (memfd, as vhost-user needs)
// and one vhost-user-blk-pci device per socket, and streams the agent's
// reports (Result) from the serial console.
//
// This package is test support: it is not a general VM launcher and it
// follows no spec beyond the initramfs buffer format, QEMU's command line and
// the Linux block-device ioctls.
package guest

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"time"
)

// ErrUnavailable is wrapped by Build's errors when a tool or a package it
// needs is missing (no apt, no network, no Go toolchain): callers that are
// tests skip on it.
var ErrUnavailable = errors.New("guest kit unavailable")

// Kit is a built guest: a kernel and an initramfs holding the agent.
type Kit struct {
	Kernel  string   // bzImage
	Initrd  string   // newc cpio initramfs, without a script
	Release string   // kernel release, e.g. "6.1.0-56-cloud-amd64"
	Modules []string // module names in load order
	Dir     string   // cache directory
}

// wantModules are the modules a virtio-blk PCI disk needs on top of what a
// distribution kernel has built in; their dependencies are added.
var wantModules = []string{"virtio_pci", "virtio_blk"}

// DefaultCacheDir is $XDG_CACHE_HOME/blockbackend-guest (or the user cache
// directory's, or the temp directory's, in that order).
func DefaultCacheDir() string {
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "blockbackend-guest")
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "blockbackend-guest")
	}
	return filepath.Join(os.TempDir(), "blockbackend-guest")
}

// Build prepares (or finds in cacheDir) the guest kit. It holds an
// exclusive lock on cacheDir/.lock while it works, so that test processes
// running at once share one download.
func Build(ctx context.Context, cacheDir string) (*Kit, error) {
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("guest: cache directory: %w", err)
	}
	lf, err := os.OpenFile(filepath.Join(cacheDir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("guest: cache lock: %w", err)
	}
	defer lf.Close()
	if err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX); err != nil {
		return nil, fmt.Errorf("guest: cache lock: %w", err)
	}
	defer syscall.Flock(int(lf.Fd()), syscall.LOCK_UN)

	// Without apt (no package lists), a cached kit is still used.
	kpkg, kver, bbver, aptErr := aptVersions(ctx)
	kdir, err := ensureKernel(ctx, cacheDir, kpkg, kver, aptErr)
	if err != nil {
		return nil, err
	}
	bbdir, err := ensureBusybox(ctx, cacheDir, bbver, aptErr)
	if err != nil {
		return nil, err
	}
	agent, err := buildAgent(ctx, cacheDir)
	if err != nil {
		return nil, err
	}
	order, err := os.ReadFile(filepath.Join(kdir, "modules", "order"))
	if err != nil {
		return nil, fmt.Errorf("guest: cached kernel: %w", err)
	}
	release, err := os.ReadFile(filepath.Join(kdir, "release"))
	if err != nil {
		return nil, fmt.Errorf("guest: cached kernel: %w", err)
	}
	kit := &Kit{
		Kernel:  filepath.Join(kdir, "vmlinuz"),
		Release: strings.TrimSpace(string(release)),
		Modules: strings.Fields(string(order)),
		Dir:     cacheDir,
	}
	h := sha256.New()
	h.Write(agent)
	io.WriteString(h, kdir+"\x00"+bbdir)
	kit.Initrd = filepath.Join(cacheDir, "initrd-"+hex.EncodeToString(h.Sum(nil))[:16]+".cpio")
	if _, err := os.Stat(kit.Initrd); err == nil {
		return kit, nil
	}
	if err := writeInitrd(kit.Initrd, agent, kdir, bbdir, kit.Modules); err != nil {
		return nil, err
	}
	pruneInitrds(cacheDir, kit.Initrd)
	return kit, nil
}

// pruneInitrds removes initramfs files of older agents (a day unused).
func pruneInitrds(dir, keep string) {
	old, _ := filepath.Glob(filepath.Join(dir, "initrd-*.cpio"))
	for _, p := range old {
		if fi, err := os.Stat(p); err == nil && p != keep && time.Since(fi.ModTime()) > 24*time.Hour {
			os.Remove(p)
		}
	}
}

func writeInitrd(path string, agent []byte, kdir, bbdir string, modules []string) error {
	var buf bytes.Buffer
	w := &cpioWriter{w: &buf}
	for _, d := range []string{"bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "agent"} {
		w.Dir(d)
	}
	// The kernel opens /dev/console for init's stdin/out/err before any
	// devtmpfs is mounted: the node must be in the archive.
	w.CharDev("dev/console", 5, 1)
	w.CharDev("dev/null", 1, 3)
	bb, err := os.ReadFile(filepath.Join(bbdir, "busybox"))
	if err != nil {
		return fmt.Errorf("guest: cached busybox: %w", err)
	}
	w.File("bin/busybox", 0o755, bb)
	w.Symlink("bin/sh", "busybox")
	w.File("init", 0o755, agent)
	for _, m := range modules {
		b, err := os.ReadFile(filepath.Join(kdir, "modules", m+".ko"))
		if err != nil {
			return fmt.Errorf("guest: cached module: %w", err)
		}
		w.File("lib/modules/"+m+".ko", 0o644, b)
	}
	w.File("lib/modules/order", 0o644, []byte(strings.Join(modules, "\n")+"\n"))
	if err := w.Close(); err != nil {
		return err
	}
	return writeAtomic(path, buf.Bytes())
}

// writeAtomic writes data to path through a temporary file and a rename.
func writeAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return fmt.Errorf("guest: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("guest: writing %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("guest: writing %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("guest: %w", err)
	}
	return nil
}

// command runs a program and returns its standard output; a missing
// program is ErrUnavailable.
func command(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	if _, err := exec.LookPath(name); err != nil {
		return nil, fmt.Errorf("guest: %s not found: %w", name, ErrUnavailable)
	}
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("guest: %s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// aptVersions reads, in one apt-cache call (each takes a second or so),
// the cloud kernel image package behind the linux-image-cloud-amd64
// metapackage with its version, and busybox-static's version.
func aptVersions(ctx context.Context) (kernelPkg, kernelVer, busyboxVer string, err error) {
	out, err := command(ctx, "", "apt-cache", "show", "--no-all-versions", "linux-image-cloud-amd64", "busybox-static")
	if err != nil {
		return "", "", "", fmt.Errorf("%w (is the apt package list present? run apt-get update): %w", err, ErrUnavailable)
	}
	kernelPkg, kernelVer, busyboxVer = parseAptShow(string(out))
	if kernelPkg == "" || kernelVer == "" || busyboxVer == "" {
		return "", "", "", fmt.Errorf("guest: apt-cache show linux-image-cloud-amd64 busybox-static: no kernel image or busybox version found: %w", ErrUnavailable)
	}
	return kernelPkg, kernelVer, busyboxVer, nil
}

// parseAptShow reads the paragraphs of `apt-cache show
// linux-image-cloud-amd64 busybox-static`.
func parseAptShow(out string) (kernelPkg, kernelVer, busyboxVer string) {
	for _, para := range strings.Split(out, "\n\n") {
		fields := map[string]string{}
		for _, l := range strings.Split(para, "\n") {
			if k, v, ok := strings.Cut(l, ": "); ok && !strings.HasPrefix(k, " ") {
				fields[k] = strings.TrimSpace(v)
			}
		}
		switch fields["Package"] {
		case "busybox-static":
			busyboxVer = fields["Version"]
		case "linux-image-cloud-amd64":
			for _, d := range strings.Split(fields["Depends"], ",") {
				name, rest, _ := strings.Cut(strings.TrimSpace(d), " ")
				if strings.HasPrefix(name, "linux-image-") {
					kernelPkg = name
					kernelVer = strings.Trim(strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(rest), "(=")), "() ")
					break
				}
			}
		}
	}
	return kernelPkg, kernelVer, busyboxVer
}

// cached returns dir/prefix+key when it exists; with an empty key (apt
// unavailable) the newest dir/prefix* instead.
func cached(dir, prefix, key string) string {
	if key != "" {
		p := filepath.Join(dir, prefix+key)
		if _, err := os.Stat(p); err == nil {
			return p
		}
		return ""
	}
	all, _ := filepath.Glob(filepath.Join(dir, prefix+"*"))
	best, bestT := "", time.Time{}
	for _, p := range all {
		if fi, err := os.Stat(p); err == nil && fi.IsDir() && fi.ModTime().After(bestT) {
			best, bestT = p, fi.ModTime()
		}
	}
	return best
}

func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if r == ':' || r == '/' || r == ' ' {
			return '_'
		}
		return r
	}, s)
}

// fetch downloads the first of pkgs that apt-get download finds into a
// fresh directory under work and unpacks it into work/root.
func fetch(ctx context.Context, work string, pkgs ...string) (string, error) {
	dl := filepath.Join(work, "dl")
	if err := os.MkdirAll(dl, 0o755); err != nil {
		return "", fmt.Errorf("guest: %w", err)
	}
	var err error
	pkg := ""
	for _, pkg = range pkgs {
		if _, err = command(ctx, dl, "apt-get", "download", "-q", pkg); err == nil {
			break
		}
	}
	if err != nil {
		return "", fmt.Errorf("%w: %w", err, ErrUnavailable)
	}
	debs, _ := filepath.Glob(filepath.Join(dl, "*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("guest: apt-get download %s left %d .deb files", pkg, len(debs))
	}
	root := filepath.Join(work, "root")
	if _, err := command(ctx, "", "dpkg-deb", "-x", debs[0], root); err != nil {
		return "", err
	}
	return root, nil
}

// ensureCached returns cacheDir/prefix+key, building it first with build
// (into out, inside a scratch directory work) when it is not there yet.
// Without apt (aptErr) any earlier build is used, whatever its version.
func ensureCached(cacheDir, prefix, key string, aptErr error, build func(work, out string) error) (string, error) {
	if aptErr != nil {
		key = ""
	}
	if d := cached(cacheDir, prefix, key); d != "" {
		return d, nil
	}
	if aptErr != nil {
		return "", aptErr
	}
	work, err := os.MkdirTemp(cacheDir, ".work-")
	if err != nil {
		return "", fmt.Errorf("guest: %w", err)
	}
	defer os.RemoveAll(work)
	out := filepath.Join(work, "out")
	if err := os.MkdirAll(out, 0o755); err != nil {
		return "", fmt.Errorf("guest: %w", err)
	}
	if err := build(work, out); err != nil {
		return "", err
	}
	final := filepath.Join(cacheDir, prefix+key)
	if err := os.Rename(out, final); err != nil {
		return "", fmt.Errorf("guest: %w", err)
	}
	return final, nil
}

func ensureKernel(ctx context.Context, cacheDir, pkg, ver string, aptErr error) (string, error) {
	return ensureCached(cacheDir, "kernel-", sanitize(pkg+"_"+ver), aptErr, func(work, out string) error {
		// The unsigned image is the same kernel without the Secure Boot
		// signature; either boots with -kernel.
		root, err := fetch(ctx, work, pkg+"-unsigned", pkg)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Join(out, "modules"), 0o755); err != nil {
			return fmt.Errorf("guest: %w", err)
		}
		kernels, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
		if len(kernels) != 1 {
			return fmt.Errorf("guest: %s holds %d boot/vmlinuz-* files", pkg, len(kernels))
		}
		release := strings.TrimPrefix(filepath.Base(kernels[0]), "vmlinuz-")
		if err := os.Rename(kernels[0], filepath.Join(out, "vmlinuz")); err != nil {
			return fmt.Errorf("guest: %w", err)
		}
		moddir := filepath.Join(root, "lib", "modules", release)
		if _, err := os.Stat(moddir); err != nil {
			// usrmerged packages put them under /usr/lib.
			moddir = filepath.Join(root, "usr", "lib", "modules", release)
		}
		order, err := collectModules(ctx, moddir, wantModules, filepath.Join(out, "modules"))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(out, "modules", "order"), []byte(strings.Join(order, "\n")+"\n"), 0o644); err != nil {
			return fmt.Errorf("guest: %w", err)
		}
		if err := os.WriteFile(filepath.Join(out, "release"), []byte(release+"\n"), 0o644); err != nil {
			return fmt.Errorf("guest: %w", err)
		}
		return nil
	})
}

func ensureBusybox(ctx context.Context, cacheDir, ver string, aptErr error) (string, error) {
	return ensureCached(cacheDir, "busybox-", sanitize(ver), aptErr, func(work, out string) error {
		root, err := fetch(ctx, work, "busybox-static")
		if err != nil {
			return err
		}
		src := filepath.Join(root, "bin", "busybox")
		if _, err := os.Stat(src); err != nil {
			src = filepath.Join(root, "usr", "bin", "busybox")
		}
		if err := os.Rename(src, filepath.Join(out, "busybox")); err != nil {
			return fmt.Errorf("guest: busybox-static: %w", err)
		}
		return nil
	})
}

// agentSource is the directory of the agent's main package, found from
// this file's path (the tests run from a source tree).
func agentSource() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("guest: cannot locate the agent source: %w", ErrUnavailable)
	}
	dir := filepath.Join(filepath.Dir(file), "agent")
	if _, err := os.Stat(filepath.Join(dir, "main.go")); err != nil {
		return "", fmt.Errorf("guest: agent source: %w: %w", err, ErrUnavailable)
	}
	return dir, nil
}

// buildAgent compiles the agent as a static binary and returns it.
func buildAgent(ctx context.Context, cacheDir string) ([]byte, error) {
	src, err := agentSource()
	if err != nil {
		return nil, err
	}
	if _, err := exec.LookPath("go"); err != nil {
		return nil, fmt.Errorf("guest: go toolchain not found: %w", ErrUnavailable)
	}
	tmp, err := os.MkdirTemp(cacheDir, ".agent-")
	if err != nil {
		return nil, fmt.Errorf("guest: %w", err)
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "agent")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("guest: building the agent: %w\n%s", err, out)
	}
	b, err := os.ReadFile(bin)
	if err != nil {
		return nil, fmt.Errorf("guest: %w", err)
	}
	return b, nil
}

// modName normalises a module name as the kernel does ('-' is '_').
func modName(s string) string { return strings.ReplaceAll(s, "-", "_") }

// collectModules copies want and their dependencies from moddir (a
// lib/modules/<release> tree) into out as NAME.ko, decompressed, and
// returns the names in an order where every module follows its
// dependencies. Modules that modules.builtin lists are skipped.
func collectModules(ctx context.Context, moddir string, want []string, out string) ([]string, error) {
	files := map[string]string{}
	err := filepath.WalkDir(filepath.Join(moddir, "kernel"), func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		base := d.Name()
		for _, ext := range []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"} {
			if strings.HasSuffix(base, ext) {
				files[modName(strings.TrimSuffix(base, ext))] = p
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("guest: modules: %w", err)
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(moddir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			builtin[modName(strings.TrimSuffix(filepath.Base(l), ".ko"))] = true
		}
	}
	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string) error
	visit = func(name string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("guest: module dependency cycle at %s", name)
		case 2:
			return nil
		}
		state[name] = 1
		path, ok := files[name]
		if !ok {
			if builtin[name] {
				state[name] = 2
				return nil
			}
			return fmt.Errorf("guest: module %s is neither in the package nor built in", name)
		}
		img, err := readModule(ctx, path)
		if err != nil {
			return err
		}
		deps, err := moduleDepends(img)
		if err != nil {
			return fmt.Errorf("guest: module %s: %w", name, err)
		}
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		if err := os.WriteFile(filepath.Join(out, name+".ko"), img, 0o644); err != nil {
			return fmt.Errorf("guest: %w", err)
		}
		state[name] = 2
		order = append(order, name)
		return nil
	}
	for _, m := range want {
		if err := visit(m); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// readModule returns the plain ELF image of a module file.
func readModule(ctx context.Context, path string) ([]byte, error) {
	switch {
	case strings.HasSuffix(path, ".xz"):
		b, err := command(ctx, "", "xz", "-dc", path)
		if err != nil {
			return nil, fmt.Errorf("%w (install xz-utils)", err)
		}
		return b, nil
	case strings.HasSuffix(path, ".zst"):
		b, err := command(ctx, "", "zstd", "-dc", path)
		if err != nil {
			return nil, fmt.Errorf("%w (install zstd)", err)
		}
		return b, nil
	case strings.HasSuffix(path, ".gz"):
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("guest: %w", err)
		}
		defer f.Close()
		z, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("guest: %s: %w", path, err)
		}
		return io.ReadAll(z)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("guest: %w", err)
	}
	return b, nil
}

// moduleDepends reads the "depends=" entry of a module's .modinfo section
// (NUL-separated key=value strings).
func moduleDepends(img []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(img))
	if err != nil {
		return nil, err
	}
	s := f.Section(".modinfo")
	if s == nil {
		return nil, errors.New("no .modinfo section")
	}
	data, err := s.Data()
	if err != nil {
		return nil, err
	}
	var deps []string
	for _, kv := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			for _, d := range strings.Split(string(v), ",") {
				if d = strings.TrimSpace(d); d != "" {
					deps = append(deps, modName(d))
				}
			}
		}
	}
	sort.Strings(deps)
	return deps, nil
}

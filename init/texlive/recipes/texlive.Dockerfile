# The TeX Live compile image: Debian's TeX Live packages on the debootstrapped base.
#
# Two builders, one recipe: scripts/build-images (the CLI, with its content key as a label) and
# the installer's `build` source (init/texlive_build.py, the Engine API with this file alone as
# the context). Both use the classic builder and the host network when the engine has no bridge
# (`--bridge=none`, as the tests' engines), so apt reaches the mirror; both pass
# TEXLIVE_PACKAGES from texlive-<scheme>.packages. No registry is involved.
ARG BASE_IMAGE=sharelatex-init/debian:bookworm
FROM ${BASE_IMAGE}

ARG SUITE=bookworm
ARG DEBIAN_MIRROR=http://deb.debian.org/debian
ARG DEBIAN_SECURITY_MIRROR=http://deb.debian.org/debian-security
ARG TEXLIVE_PACKAGES

SHELL ["/bin/bash", "-euo", "pipefail", "-c"]

# One layer, so nothing the install leaves behind (indexes, caches, logs) reaches the image.
# - The mirror is this build's only (a source list under /tmp); the image keeps the base's
#   deb.debian.org sources. Upgrading first brings in security fixes the debootstrapped base
#   lacks: compiles read untrusted input through libpng, freetype, poppler.
#   `--error-on=any`: an unreachable source fails the build instead of being skipped.
# - The packages bring no compiler or network tool (apt-get install -s texlive-full shows
#   none): the check below fails the build, rather than purge, if that ever changes.
# - `tex` (1000:1000) runs compiles; HOME is /tmp because the root is read-only at run time.
# - The font caches a first compile makes (issue #15: every compile gets a fresh /tmp, so
#   whatever it made there is gone for the next) are made here once, read-only, in TEXMFSYSVAR
#   (Debian: /var/lib/texmf), which kpathsea and luaotfload search after the compile's own
#   TEXMFVAR: probe documents compiled with TEXMFVAR pointed there. pdflatex's PK fonts
#   (mktexpk, ~2 s each: sample2e's textcomp font, the EC fonts of a T1 article), listed in
#   that tree's ls-R by mktexpk itself (its PK dirs are `!!`, ls-R only); luaotfload's font
#   caches of Latin Modern. mktexpk's append-only dirs (1777) are closed: root's alone.
#   (luaotfload still indexes the font names in the compile's TEXMFVAR: it looks for that
#   index in its writable cache only.)
RUN test -n "${TEXLIVE_PACKAGES}" || { echo "build arg TEXLIVE_PACKAGES is empty" >&2; exit 1; }; \
    sources=/tmp/build-sources.list; \
    echo "deb ${DEBIAN_MIRROR} ${SUITE} main" > "$sources"; \
    echo "deb ${DEBIAN_MIRROR} ${SUITE}-updates main" >> "$sources"; \
    if [ -n "${DEBIAN_SECURITY_MIRROR}" ]; then \
        echo "deb ${DEBIAN_SECURITY_MIRROR} ${SUITE}-security main" >> "$sources"; \
    fi; \
    apt=(apt-get -q -y -o "Dir::Etc::SourceList=$sources" -o "Dir::Etc::SourceParts=-"); \
    export DEBIAN_FRONTEND=noninteractive; \
    "${apt[@]}" update --error-on=any; \
    "${apt[@]}" upgrade; \
    "${apt[@]}" install --no-install-recommends ${TEXLIVE_PACKAGES}; \
    for tool in gcc cc c++ curl wget nc ssh; do \
        if command -v "$tool" >/dev/null; then \
            echo "$tool is in the image: the package list pulls it in" >&2; exit 1; \
        fi; \
    done; \
    groupadd --gid 1000 tex; \
    useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin tex; \
    install -d -o 1000 -g 1000 -m 0755 /compile; \
    fonts_began=$(date +%s); \
    sysvar=$(kpsewhich -var-value TEXMFSYSVAR); \
    probe=$(mktemp -d); \
    cd "$probe"; \
    cp "$(kpsewhich sample2e.tex)" .; \
    printf '%s\n' '\documentclass{article}' '\begin{document}' '\title{Probe}\author{Fonts}' \
        '\maketitle\section{One}\subsection{Two} Text \textbf{bold} \textit{italic}' \
        '\textsl{slanted} \textsc{Caps} \texttt{mono} \textsf{sans} {\small small}' \
        '{\footnotesize foot} {\large large}\footnote{note} $x_1^2 = \sum_i y_i$.' \
        '\end{document}' > article.tex; \
    sed 's/^\\documentclass{article}$/&\\usepackage[T1]{fontenc}/' article.tex > t1.tex; \
    probe() { \
        TEXMFVAR="$sysvar" VARTEXFONTS="$sysvar/fonts" "$1" -interaction=batchmode "$2" \
            >/dev/null 2>&1 || { tail -n 20 "$2.log" >&2; exit 1; }; \
    }; \
    probe pdflatex sample2e; probe pdflatex article; probe pdflatex t1; \
    if command -v lualatex >/dev/null; then probe lualatex article; fi; \
    if command -v xelatex >/dev/null; then probe xelatex article; fi; \
    cd /; rm -rf "$probe"; \
    find "$sysvar" -perm /022 ! -type l -exec chmod go-w {} +; \
    echo "font caches made in $(( $(date +%s) - fonts_began )) s: $(du -sh "$sysvar/fonts/pk" \
        "$sysvar/luatex-cache" 2>/dev/null | tr '\n\t' '  ')"; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old \
        /var/log/apt/* /var/log/dpkg.log /var/log/alternatives.log /tmp/* /tmp/.[!.]*

# TEXMFVAR and VARTEXFONTS on /tmp: the font caches luaotfload and mktexpk write must be
# writable with `--read-only --tmpfs /tmp`.
ENV HOME=/tmp \
    LANG=C.UTF-8 \
    TEXMFVAR=/tmp/texmf-var \
    VARTEXFONTS=/tmp/texfonts

LABEL org.opencontainers.image.title="sharelatex-init TeX Live" \
      org.opencontainers.image.description="Debian's TeX Live for sandboxed compiles, run as uid 1000"

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 1000:1000
WORKDIR /compile
CMD ["latexmk", "-version"]

# The compile agent: PID 1 of a project's warm container (init/broker/agent.py starts it).
#
# It reads requests on its stdin, one JSON object a line, and answers on its stdout, one JSON
# object a line; both are the container's attached stdio, held by the broker. A compile never
# holds them: it is forked with stdin /dev/null and stdout/stderr on pipes the agent reads and
# frames (base64) into its own answers, and the agent makes itself non-dumpable first, so the
# compile (same uid) cannot open /proc/1/fd/* nor ptrace it. As the namespace's PID 1 it cannot
# be SIGKILLed or SIGSTOPped from inside; it ends on SIGTERM (docker stop, or a compile that
# sends it: that compile ends its own container, nothing else), on EOF of its stdin (the broker
# let go), when idle for IDLE seconds, or at LIFETIME. It runs as the project's own uid in the
# compile dir's group (the container's User), as every compile it starts, with umask 002
# (init/compiles/identity.py: what the compile writes is its group's, CLSI's).
#
# Only core perl (latexmk needs perl: every TeX Live image has it; python it may not).
#
# Request:  {"id":"..","argv":[..],"cwd":"/abs","timeout":S,"env":{..},"tidy":"/abs"}
#           tidy: after the compile, and before it in a container that has not tidied yet,
#           /tmp emptied entirely and what the compile made in that dir handed back to the
#           dir's group (sub tidy); when it fails, the agent answers and then exits: its
#           container is never used again
#           {"op":"cancel","id":".."}  (while that compile runs)
# Answers:  {"agent":"ready","version":1,"pid":1}
#           {"id":"..","fd":1|2,"data":"<base64>"}  the compile's output, in order
#           {"id":"..","exit":N|null,"signal":N|null,"reason":"exit|signal|timeout|cancelled|error",
#            "seconds":S,"leftovers":N,"message":".."}
use strict;
use warnings;
use POSIX qw(:sys_wait_h :errno_h setsid dup2 _exit);
use Time::HiRes qw(clock_gettime CLOCK_MONOTONIC);
use JSON::PP ();
use MIME::Base64 qw(encode_base64);
use Errno qw(EINTR ECHILD EAGAIN);

my $VERSION = 1;
my $MAX_LINE = 1 << 20;       # a request longer than this is refused, not buffered
my $CHUNK = 65536;            # the most compile output one answer carries
my $DRAIN = 5;                # seconds to read what the dead compile left in its pipes
my $TIDY = 10;                # seconds for the tidy before, and again after, a compile
my ($IDLE, $LIFETIME) = (@ARGV, 60, 3600)[0, 1];
my $json = JSON::PP->new->ascii->canonical;
my $started = now();
my $stdin_buffer = '';
my $stdin_open = 1;
my $retire = 0;               # a tidy failed: nothing may be run here again
# The last compile's tidy succeeded and nothing has run since (it would have failed, or the
# agent would have exited): the tidy before the next compile would find nothing to do. A fresh
# container tidies first: the last one of the project may have died before its tidy (the OOM
# killer, a timeout), leaving files in the dir its group cannot yet write.
my $tidied = 0;

sub now { clock_gettime(CLOCK_MONOTONIC) }

# The broker must be the only writer of our stdout: not dumpable means /proc/1/fd, /proc/1/mem
# and ptrace need CAP_SYS_PTRACE, which nothing in the container has.
sub not_dumpable {
    my $machine = (POSIX::uname())[4];
    my %prctl = (x86_64 => 157, aarch64 => 167, ppc64le => 171, s390x => 172);
    my $nr = $prctl{$machine} or die "agent: no prctl number for $machine\n";
    syscall($nr, 4, 0, 0, 0, 0) == 0 or die "agent: prctl(PR_SET_DUMPABLE, 0): $!\n";
}

sub answer {
    my $line = $json->encode($_[0]) . "\n";
    my $off = 0;
    while ($off < length $line) {
        my $n = syswrite(STDOUT, $line, length($line) - $off, $off);
        if (!defined $n) { next if $! == EINTR; exit 0; }   # the broker is gone
        $off += $n;
    }
}

# A SIGCHLD handler (doing nothing) makes select return EINTR when a child ends: events, not
# polling. TERM/INT end the container.
$SIG{CHLD} = sub { };
$SIG{TERM} = $SIG{INT} = sub { end_everything(); exit 0 };
$SIG{PIPE} = 'IGNORE';
# Linux drops a signal sent from inside the container to its PID 1 unless PID 1 handles it;
# gVisor (runsc 20221219) delivers it: a compile's `kill -HUP 1` would end the agent there. So
# every other signal that would end or stop it and that it can catch is caught and dropped
# (a handler, not 'IGNORE', which the compile would inherit through exec). KILL and STOP
# cannot be caught, and a fault (SEGV, BUS, ILL, FPE, TRAP, SYS) keeps its default: under
# gVisor those end, or stop, the agent and so only its own container.
{
    my %keep = map { $_ => 1 } qw(KILL STOP CHLD CLD TERM INT PIPE CONT URG WINCH
                                  SEGV BUS ILL FPE TRAP SYS IOT);
    no warnings;
    for my $name (keys %SIG) {   # every signal perl knows (no Config: it costs a file read)
        next if $keep{$name} || $name =~ /^NUM3[23]$/;   # 32, 33: the C library's own
        eval { $SIG{$name} = sub { } };
    }
}

sub reap_all {
    # Kill whatever is left (kill -1 from PID 1: every other process of the container), and
    # reap until there is no child at all: the next compile finds nothing of this one.
    my $count = 0;
    while (1) {
        kill 'KILL', -1;
        my $pid = waitpid(-1, 0);
        if ($pid > 0) { $count++; next }
        last if $! == ECHILD;
    }
    return $count;
}

sub end_everything { reap_all() }

# select(2) that fails for another reason than a signal fails again at once: the agent would
# spin a core and never read a request (gVisor refused pselect6 to a seccomp profile that
# named it only so). It ends instead, saying why on stderr; the broker sees its container end.
sub select_failed {
    my $why = "$!";
    end_everything();
    die "agent: select: $why\n";
}

# The compile's group; the compile itself when it has not made its group yet (a cancel that
# came with its request): then it has started nothing else either.
sub kill_group {
    my ($pid) = @_;
    kill('KILL', -$pid) or kill('KILL', $pid);
}

# The request's tidy, done here without a process (a shell, rm and find cost 22 ms a compile
# under runc and ~300 ms under gVisor's ptrace platform, where every exec is dear), at most
# TIDY seconds; true when it is done. Nothing else runs meanwhile: the compile has not started,
# or it has been reaped with all it left (kill -1), so nothing can swap a dir for a link under
# it. The rules are the exec path's (init/compiles/profile.py, _COMPILE_SCRIPT):
# - /tmp (HOME, TEXMFVAR) emptied, dotfiles and all: what one compile planted there never
#   reaches the next. A dir the compile made unreadable is opened up first. Nothing on another
#   filesystem is entered (a compile dir bound under /tmp, as the tests have it), and the dirs
#   that lead to one stay. Anything else that stays is a failure: the container retires.
# - What the compile made in the dir `tidy` names is handed back to the dir's group: its dirs
#   rwx and setgid for the group, files readable and writable by it, never setuid or setgid
#   (init/compiles/identity.py). A dir is changed before it is read, so a 0000 one is opened.
#   Only what this uid owns; links are never followed. The dir itself gone: a failure.
sub tidy {
    my ($r) = @_;
    my $dir = $r->{tidy};
    return 1 unless defined $dir && length $dir;
    utf8::encode($dir);
    my $deadline = now() + $TIDY;
    my $ok = chdir('/tmp') && empty_here((lstat '.')[0], $deadline);
    my @top = lstat $dir;
    $ok = @top && -d _ && share_dir($dir, @top) && chdir($dir) && hand_back_here($deadline) && $ok;
    chdir '/';
    return $ok;
}

# Every entry of the working dir removed, depth first, not crossing into another filesystem
# (`dev`): true when nothing is left but the dirs that lead to another filesystem.
sub empty_here {
    no warnings 'recursion';
    my ($dev, $deadline) = @_;
    opendir(my $dh, '.') or return 0;
    my @names = grep { $_ ne '.' && $_ ne '..' } readdir $dh;
    closedir $dh;
    my $ok = 1;
    for my $name (@names) {
        return 0 if now() > $deadline;
        my @st = lstat $name or next;   # gone since the listing
        if (!-d _) { unlink $name or $ok = 0; next }
        next if $st[0] != $dev;   # a mount point: left, and so is the path to it
        chmod(($st[2] & 07777) | 0700, $name) if ($st[2] & 0700) != 0700 && $st[4] == $<;
        chdir $name or do { $ok = 0; next };
        my $emptied = empty_here($dev, $deadline);
        chdir '..' or return 0;
        $ok = 0 unless $emptied;
        rmdir $name or $emptied && mount_below($name, $dev) or $ok = 0;
    }
    return $ok;
}

# A dir that could not be removed, though emptied: it still holds a mount point (a dir of
# another filesystem), which is all empty_here leaves.
sub mount_below {
    my ($name, $dev) = @_;
    opendir(my $dh, $name) or return 0;
    my @names = grep { $_ ne '.' && $_ ne '..' } readdir $dh;
    closedir $dh;
    for my $entry (@names) {
        my @st = lstat "$name/$entry" or return 0;
        return 0 unless -d _;
        next if $st[0] != $dev;
        return 0 unless mount_below("$name/$entry", $dev);
    }
    return @names > 0;
}

# A dir of this uid made rwx and setgid for its group (the uid's rwx too).
sub share_dir {
    my ($name, @st) = @_;
    return 1 unless $st[4] == $< && ($st[2] & 02770) != 02770;
    return chmod(($st[2] & 07777) | 02770, $name);
}

# Everything below the working dir handed back to its group (see tidy).
sub hand_back_here {
    no warnings 'recursion';
    my ($deadline) = @_;
    opendir(my $dh, '.') or return 1;   # not ours to read: passed over, as find does
    my @names = grep { $_ ne '.' && $_ ne '..' } readdir $dh;
    closedir $dh;
    for my $name (@names) {
        return 0 if now() > $deadline;
        my @st = lstat $name or next;
        if (-d _) {
            share_dir($name, @st);   # before it is read: a 0000 dir is opened up
            next unless chdir $name;
            my $ok = hand_back_here($deadline);
            chdir '..' or return 0;
            return 0 unless $ok;
        } elsif (-f _ && $st[4] == $<) {
            my $mode = $st[2] & 07777;
            my $wanted = ($mode | 0060) & ~06000;
            chmod($wanted, $name) if $wanted != $mode;
        }
    }
    return 1;
}

sub valid {
    my ($r) = @_;
    return "not an object" unless ref $r eq 'HASH';
    return "no id" unless defined $r->{id} && !ref $r->{id};
    return "argv: a non-empty list of strings"
      unless ref $r->{argv} eq 'ARRAY' && @{ $r->{argv} } && !grep { !defined || ref } @{ $r->{argv} };
    return "cwd: an absolute path" unless defined $r->{cwd} && !ref $r->{cwd} && $r->{cwd} =~ m{^/};
    return "timeout: seconds > 0"
      unless defined $r->{timeout} && !ref $r->{timeout} && $r->{timeout} =~ /^[0-9.]+$/ && $r->{timeout} > 0;
    return "env: an object of strings"
      if defined $r->{env} && (ref $r->{env} ne 'HASH' || grep { !defined || ref } values %{ $r->{env} });
    return "tidy: an absolute path"
      if defined $r->{tidy} && (ref $r->{tidy} || ($r->{tidy} ne '' && $r->{tidy} !~ m{^/}));
    return '';
}

# The next line of stdin, if a whole one is buffered; '' for one refused as too long.
sub next_line {
    my $i = index($stdin_buffer, "\n");
    if ($i < 0) {
        if (length $stdin_buffer > $MAX_LINE) { $stdin_buffer = ''; $stdin_open = -1 }
        return undef;
    }
    my $line = substr($stdin_buffer, 0, $i);
    substr($stdin_buffer, 0, $i + 1) = '';
    return $line;
}

sub read_stdin {
    my $n = sysread(STDIN, $stdin_buffer, $CHUNK, length $stdin_buffer);
    return 1 if defined $n && $n > 0;
    return 1 if !defined $n && ($! == EINTR || $! == EAGAIN);
    $stdin_open = 0;
    return 0;
}

sub run_compile {
    my ($r) = @_;
    my $id = $r->{id};
    if (!$tidied && !tidy($r)) {
        $retire = 1;
        return answer({ id => $id, reason => 'error', message => 'tidy before the compile failed',
                        exit => undef, signal => undef, seconds => 0, leftovers => 0 });
    }
    $tidied = 0;
    my $began = now();
    pipe(my $out_r, my $out_w) or return answer({ id => $id, reason => 'error', message => "pipe: $!" });
    pipe(my $err_r, my $err_w) or return answer({ id => $id, reason => 'error', message => "pipe: $!" });
    my @argv = @{ $r->{argv} };
    utf8::encode($_) for @argv;
    my $cwd = $r->{cwd};
    utf8::encode($cwd);
    my $pid = fork;
    if (!defined $pid) {
        return answer({ id => $id, reason => 'error', message => "fork: $!", exit => undef,
                        signal => undef, seconds => 0, leftovers => reap_all() });
    }
    if ($pid == 0) {
        # The compile: a session (and process group) of its own, none of the agent's stdio.
        $SIG{$_} = 'DEFAULT' for qw(CHLD TERM INT PIPE);
        setsid();
        open(STDIN, '<', '/dev/null');
        dup2(fileno($out_w), 1);
        dup2(fileno($err_w), 2);
        while (my ($k, $v) = each %{ $r->{env} || {} }) {
            utf8::encode($k); utf8::encode($v); $ENV{$k} = $v;
        }
        chdir $cwd or do { syswrite(STDERR, "agent: cd $cwd: $!\n"); _exit(127) };
        { no warnings 'exec'; exec { $argv[0] } @argv; }
        syswrite(STDERR, "agent: cannot run $argv[0]: $!\n");
        _exit(127);
    }
    close $out_w;
    close $err_w;
    my %open = (fileno($out_r) => [$out_r, 1], fileno($err_r) => [$err_r, 2]);
    my $deadline = $began + $r->{timeout};
    my ($status, $reason);
    my $leftovers = 0;
    my $drain_until;
    while (%open || !defined $status) {
        if (!defined $status) {
            my $w = waitpid($pid, WNOHANG);
            if ($w == $pid) {
                $status = $?;
                # Whatever it left (a daemon in a session of its own) dies now, so the pipes
                # close and nothing runs on into the next compile.
                $leftovers += reap_all();
                $drain_until = now() + $DRAIN;
                next;
            }
        }
        my $left = (defined $drain_until ? $drain_until : $deadline) - now();
        if ($left <= 0) {
            last if defined $status;   # D-state writers: give up on the pipes
            $reason = 'timeout';
            kill_group($pid);
            next;
        }
        my $rin = '';
        vec($rin, $_, 1) = 1 for keys %open;
        vec($rin, 0, 1) = 1 if $stdin_open > 0;
        # Lines already buffered first: a cancel may have come in the same read as its request.
        while (defined(my $line = next_line())) {
            my $msg = eval { $json->decode($line) };
            if (ref $msg eq 'HASH' && ($msg->{op} || '') eq 'cancel' && defined $msg->{id} && $msg->{id} eq $id) {
                $reason ||= 'cancelled';
                kill_group($pid);
            } else {
                answer({ id => (ref $msg eq 'HASH' && !ref $msg->{id} ? $msg->{id} : undef),
                         reason => 'error', message => 'busy: one compile at a time' });
            }
        }
        my $n = select(my $rout = $rin, undef, undef, $left);
        select_failed() if $n < 0 && $! != EINTR;
        next if $n <= 0;   # EINTR (a child ended) or the deadline
        if ($stdin_open > 0 && vec($rout, 0, 1)) {
            read_stdin();
            if (!$stdin_open) { $reason ||= 'cancelled'; kill_group($pid); }
            next;   # its lines are taken at the top
        }
        for my $fd (keys %open) {
            next unless vec($rout, $fd, 1);
            my ($fh, $which) = @{ $open{$fd} };
            my $got = sysread($fh, my $data, $CHUNK);
            next if !defined $got && $! == EINTR;
            if (!$got) { close $fh; delete $open{$fd}; next; }
            answer({ id => $id, fd => $which, data => encode_base64($data, '') });
        }
    }
    close $_->[0] for values %open;
    $leftovers += reap_all();
    my $seconds = sprintf('%.3f', now() - $began) + 0;
    $retire = 1 unless tidy($r);
    $tidied = !$retire;
    my %end = (id => $id, seconds => $seconds, leftovers => $leftovers, exit => undef,
               signal => undef);
    $end{message} = 'tidy after the compile failed: the agent exits' if $retire;
    if (WIFEXITED($status)) { $end{exit} = WEXITSTATUS($status); $reason ||= 'exit'; }
    else { $end{signal} = WTERMSIG($status); $reason ||= 'signal'; }
    $end{reason} = $reason;
    answer(\%end);
}

# `kill -1` ends "every other process": of the container when this is its PID 1, of the whole
# machine's user otherwise. Never anywhere else.
$$ == 1 or die "agent: not PID 1 of a container (pid $$): refusing to start\n";
not_dumpable();
umask 002;
binmode STDIN; binmode STDOUT;
answer({ agent => 'ready', version => $VERSION, pid => $$ + 0 });
my $last = now();
while (1) {
    while (defined(my $line = next_line())) {
        my $r = eval { $json->decode($line) };
        my $problem = $@ ? 'not JSON' : valid($r);
        if (ref $r eq 'HASH' && ($r->{op} || 'run') eq 'cancel') { next }   # it ended already
        if ($problem) {
            answer({ id => (ref $r eq 'HASH' && !ref $r->{id} ? $r->{id} : undef), reason => 'error',
                     message => "bad request: $problem" });
            next;
        }
        run_compile($r);
        exit 0 if $retire;   # its container is gone before anything else runs in it
        $last = now();
    }
    if ($stdin_open < 0) {   # a line past MAX_LINE: refused, and the rest of it skipped
        answer({ id => undef, reason => 'error', message => "bad request: longer than $MAX_LINE bytes" });
        $stdin_open = 1;
        # Skip to the end of the long line.
        while ($stdin_open > 0 && index($stdin_buffer, "\n") < 0) {
            $stdin_buffer = '';
            my $rin = ''; vec($rin, 0, 1) = 1;
            select(my $rout = $rin, undef, undef, undef);
            read_stdin();
        }
        substr($stdin_buffer, 0, index($stdin_buffer, "\n") + 1) = '' if $stdin_open > 0;
        next;
    }
    exit 0 unless $stdin_open;
    my $wait = $last + $IDLE - now();
    my $life = $started + $LIFETIME - now();
    $wait = $life if $life < $wait;
    exit 0 if $wait <= 0;
    my $rin = ''; vec($rin, 0, 1) = 1;
    my $n = select(my $rout = $rin, undef, undef, $wait);
    select_failed() if $n < 0 && $! != EINTR;
    if ($n > 0) { read_stdin() }
    elsif ($n < 0) { 1 while waitpid(-1, WNOHANG) > 0 }   # EINTR: an orphan to reap
}

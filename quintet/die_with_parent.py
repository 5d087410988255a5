"""Imported for its effect, first in a forkserver's preload list: the forkserver dies with the process
that started it, and every worker it forks dies with the forkserver (`quintet.processes`).

First, because a forkserver only reads its pipe for a dead parent once all its preloads are imported,
and the next one (`quintet.data.curation.preload`) takes seconds. The parent's PID comes from
$QUINTET_PARENT_PID (set by the parent): a parent killed before this runs is then noticed too.
"""

import os

from quintet.processes import children_die_with_this_process, die_with_parent

die_with_parent(int(os.environ.get("QUINTET_PARENT_PID", os.getppid())))
children_die_with_this_process()

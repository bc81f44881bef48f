"""Controller activities: everything the job workflow does outside itself."""

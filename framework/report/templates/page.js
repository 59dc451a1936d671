(function(){
  function all(root,q){return Array.prototype.slice.call(root.querySelectorAll(q));}
  all(document,'.viewer').forEach(function(box){
    var data=JSON.parse(document.getElementById(box.getAttribute('data-views')).textContent);
    var select=box.querySelector('select'), frame=box.querySelector('iframe');
    function show(){frame.srcdoc=data[select.value];}
    select.addEventListener('change',show);
    all(box,'button[data-step]').forEach(function(b){
      b.addEventListener('click',function(){
        var i=select.selectedIndex+parseInt(b.getAttribute('data-step'),10);
        if(i>=0&&i<select.options.length){select.selectedIndex=i;show();}
      });
    });
  });
  function fit(f){try{var d=f.contentDocument;if(!d||!d.documentElement)return;
    var h=d.documentElement.scrollHeight;if(h>0)f.style.height=Math.min(Math.max(h+24,140),900)+'px';}catch(e){}}
  all(document,'iframe.view').forEach(function(f){f.addEventListener('load',function(){fit(f);});fit(f);});
  // The load check (read by the tests after a headless render): every image and canvas, on the page and in
  // the embedded views, must show something and sit in a <figure> with a caption.
  function captioned(el){var fig=el.closest('figure');var cap=fig&&fig.querySelector('figcaption');
    return !!(cap&&cap.textContent.trim());}
  function blank(c){if(!c.width||!c.height)return true;
    try{var d=c.getContext('2d').getImageData(0,0,c.width,c.height).data;
      for(var i=3;i<d.length;i+=4){if(d[i]!==0)return false;}return true;}catch(e){return false;}}
  window.addEventListener('load',function(){
    var n={images:0,broken:0,canvases:0,blank:0,uncaptioned:0,frames:0,unreadable:0};
    var docs=[{doc:document,where:'report'}];
    all(document,'iframe').forEach(function(f){n.frames++;
      try{if(f.contentDocument&&f.contentDocument.body){docs.push({doc:f.contentDocument,where:f.title});}
          else{n.unreadable++;}}catch(e){n.unreadable++;}});
    function bad(kind,el,where){console.error('tuneshift-report: '+kind+' '+(el.getAttribute('alt')||el.id||'')+
      ' in '+where);}
    docs.forEach(function(d){
      all(d.doc,'img').forEach(function(i){n.images++;
        if(!(i.complete&&i.naturalWidth>0)){n.broken++;bad('broken image',i,d.where);}
        if(!captioned(i)){n.uncaptioned++;bad('image without caption',i,d.where);}});
      all(d.doc,'canvas').forEach(function(c){n.canvases++;
        if(blank(c)){n.blank++;bad('blank canvas',c,d.where);}
        if(!captioned(c)){n.uncaptioned++;bad('canvas without caption',c,d.where);}});
    });
    var ids=all(document,'section[id]').length;
    document.body.setAttribute('data-report-check','loaded images='+n.images+' broken='+n.broken+' canvases='+
      n.canvases+' blank='+n.blank+' uncaptioned='+n.uncaptioned+' frames='+n.frames+' unreadable='+
      n.unreadable+' sections='+ids);
    console.log('tuneshift-report: loaded, '+n.images+' images, '+n.canvases+' canvases, '+n.frames+' frames');
  });
})();
